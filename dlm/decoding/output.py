"""What every decoder returns: tokens per row and the forward count behind them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    """Per row: generated ids, cut after the first EOS (kept) and before the first stop string."""
    nfe: int
    """Decoding forward passes for the whole batch (prefill excluded; AR: one per generated position)."""
    num_generated: list[int]
    """Per row: len(tokens[i])."""

    @property
    def tokens_per_forward(self) -> float:
        """TPF: mean generated tokens per row / nfe (AR decoding of one row gives 1.0)."""
        if self.nfe == 0:
            return 0.0
        return sum(self.num_generated) / len(self.num_generated) / self.nfe
