"""`bidirectional`: every token sees every token (LLaDA-style full attention; the ablation's upper
end).

Its training mask has no causal order, so a KV cache cannot hold what training computed: decoding
attends block-causally over the cache (`exact_cache` False), the approximation this ablation
measures."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dlm.tensor.patterns.base import MaskFn, Pattern


@dataclass(frozen=True)
class Bidirectional(Pattern):
    name = "bidirectional"
    exact_cache = False
    flash_is_causal = False

    def mask_fn(self, seq_len: int) -> MaskFn:
        def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return (q >= 0) & (k >= 0)

        return fn
