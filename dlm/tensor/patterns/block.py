"""`block`: ``blk(k) <= blk(q)`` over the noisy sequence alone: block-causal, with a *noisy* context
in training (the earlier blocks are masked too), a clean one at decode time: the ablation of what
the clean half buys."""

from __future__ import annotations

from dataclasses import dataclass

from dlm.tensor.patterns.base import Pattern


@dataclass(frozen=True)
class Block(Pattern):
    name = "block"
