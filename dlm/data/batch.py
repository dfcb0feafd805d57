"""The training batch: exactly what one step consumes, as a typed object
(Lightning moves its tensors)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class TrainBatch:
    """A noised batch of packed rows (the DataModule's collate makes it;
    `DiffusionLM` consumes it)."""

    input_ids: Tensor
    """(B, L) long: the clean rows x_0 (doubled with `masking.complementary`)."""
    eligible: Tensor
    """(B, L) bool: the tokens the loss may score (responses, with an SFT prompt/response split)."""
    noised_ids: Tensor | None = None
    """(B, L) long: x_t, masked positions replaced by [MASK];
    None under an autoregressive pattern."""
    mask: Tensor | None = None
    """(B, L) bool: the masked positions."""
    num_masked: Tensor | None = None
    """(B, L / block) long: masked tokens per block (the ELBO weight's k)."""
    num_eligible: Tensor | None = None
    """(B, L / block) long: eligible tokens per block (the ELBO weight's n)."""
    document_ids: Tensor | None = None
    """(B, L) long: each token's document in its packed row (`data.document_mask`)."""
    block_size: int | None = None
    """A block-size schedule's stage: the size the noise was drawn at
    (None: the configured size)."""
