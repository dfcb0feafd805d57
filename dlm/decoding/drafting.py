"""Who proposes the tokens self-speculative decoding verifies: a `Drafter`.

The causal path accepts a draft only where it equals its own greedy token, so any drafter keeps the
output; a better one only cuts the forwards. The default is the model's own diffusion path
(`SelfDrafter`: the argmax of the noisy block's logits). Tests pass an oracle drafter, and an
external draft model fits the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from dlm.decoding.policies import without_mask


@dataclass
class DraftRequest:
    """The next `length` tokens of each row, from position `first` on."""

    rows: list[int]
    """Each row's index in the caller's batch (rows leave the batch as they finish)."""
    first: Tensor  # (B,) long: the position of each row's first drafted token
    length: int
    logits: Tensor | None
    """`(B, length, V)`: the model's noisy-block logits at those positions (None for a drafter
    without `noisy_pass`)."""


class Drafter(Protocol):
    noisy_pass: bool
    """Whether it reads the model's noisy-block logits: the separate form runs its draft forward
    only then."""

    def draft(self, request: DraftRequest) -> Tensor:
        """`(B, length)` long: the proposed tokens."""


@dataclass
class SelfDrafter:
    """The model's own diffusion path: the most likely token at each masked position ([MASK] itself
    excluded)."""

    mask_token_id: int
    noisy_pass: bool = True

    def draft(self, request: DraftRequest) -> Tensor:
        return without_mask(request.logits, self.mask_token_id).argmax(dim=-1)
