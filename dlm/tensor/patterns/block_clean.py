"""`block_clean`: input ``x_t ⊕ x_0`` (BD3-LM's vectorised training), each noisy block seeing the
clean blocks before it and itself; the paper's winner.

`clean_context` shapes the clean half: `block` (block-causal, BD3-LM) or `causal` (token-causal: the
clean KV cache is then exactly a causal LM's, so one network is an AR model and its own drafter: the
joint AR + diffusion objective and self-speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dlm.settings import CLEAN_CONTEXTS, check
from dlm.tensor.patterns.base import Pattern, Slots, block_causal


@dataclass(frozen=True)
class BlockClean(Pattern):
    name = "block_clean"
    two_halves = True
    clean_context: str = "block"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.clean_context in CLEAN_CONTEXTS, "attention.clean_context", self.clean_context,
              "unknown clean context", CLEAN_CONTEXTS)

    def clean_sees(self, q: Slots, k: Slots) -> Tensor:
        return k.index <= q.index if self.verifies else block_causal(q.block, k.block)

    @property
    def verifies(self) -> bool:
        return self.clean_context == "causal"
