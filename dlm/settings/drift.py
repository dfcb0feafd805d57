"""Settings of `dlm drift`: which AR model the weights are compared with, and where the figure
goes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dlm.settings.errors import check


@dataclass
class DriftConfig:
    reference: str
    """The AR model folder the checkpoints were converted from."""
    plot: Optional[str] = None
    """Write the drift figure here (PNG)."""
    step: int = 0
    """Step to log the MLflow metrics at."""

    def __post_init__(self) -> None:
        check(self.step >= 0, "drift.step", self.step, "must be >= 0")
