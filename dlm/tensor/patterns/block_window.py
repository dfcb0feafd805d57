"""`block_window`: block_clean whose context is a sliding window of the `window` blocks before each
block.

A noisy block sees its own block and the clean blocks ``b - window .. b - 1``; a clean token of
block b sees the clean blocks ``b - window .. b``. Attention cost per token is then bounded by
``(window + 1) * block_size`` however long the sequence, the shape long-context conversion needs
(SWA-style layers over blocks). The KV cache stays exact: every committed block's keys and values
are computed under the same window. The decoder still keeps every block in its cache (the mask hides
those outside the window); a cache that drops them is the memory saving still to build. Set with
`attention.pattern=block_window attention.options.window=W`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dlm.settings import check
from dlm.tensor.patterns.base import Pattern, Slots


@dataclass(frozen=True)
class BlockWindow(Pattern):
    name = "block_window"
    two_halves = True
    window: int = 2
    """Earlier blocks each block sees (>= 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        is_int = isinstance(self.window, int) and not isinstance(self.window, bool)
        check(is_int and self.window >= 1, "attention.options.window", self.window,
              "must be an integer >= 1 (earlier blocks each block sees)")

    def _in_window(self, q: Slots, k: Slots) -> Tensor:
        return k.block >= q.block - self.window

    def clean_sees(self, q: Slots, k: Slots) -> Tensor:
        return (k.block <= q.block) & self._in_window(q, k)

    def noisy_sees(self, q: Slots, k: Slots) -> Tensor:
        return (k.block < q.block) & self._in_window(q, k)
