"""What every decoder returns: tokens per row and the forward count behind them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    """Per row: generated ids, cut after the first EOS (kept) and before the first stop string."""
    nfe: int
    """Model forwards of the whole batch: every one a generate call makes (diffusion: one per pass,
    the prompt fed in the first; AR: one per generated position, the prefill giving the first;
    speculative: prefill + steps)."""
    num_generated: list[int]
    """Per row: len(tokens[i])."""
    row_forwards: list[int] = field(default_factory=list)
    """Per row: the forwards it took part in (a row that finished early left the batch)."""
    raw_lengths: list[int] = field(default_factory=list)
    """Per row: tokens decoded before truncation (through the end of the block it stopped in)."""

    @property
    def tokens_per_forward(self) -> float:
        """TPF: generated tokens per forward a row took part in (AR decoding gives 1.0)."""
        batch_forwards = self.nfe * len(self.num_generated)
        forwards = sum(self.row_forwards) if self.row_forwards else batch_forwards
        return sum(self.num_generated) / forwards if forwards else 0.0
