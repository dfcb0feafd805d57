"""`causal`: ``k <= q``, the AR model itself (the baseline every conversion is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dlm.tensor.patterns.base import Pattern, Slots


@dataclass(frozen=True)
class Causal(Pattern):
    name = "causal"
    autoregressive = True
    flash_is_causal = True

    def clean_sees(self, q: Slots, k: Slots) -> Tensor:
        return k.index <= q.index
