"""Where runs are tracked: an experiment's MLflow section, and the run a one-shot command logs
into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional


@dataclass
class TrackingConfig:
    enabled: bool = True
    """False: no MLflow run (mlflow need not be installed); the metrics go to
    `<output_dir>/metrics/metrics.csv` (Lightning's CSVLogger). For machines without the MLflow
    stack (an offline GPU node) and scratch runs."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; None: the local store sqlite:///mlflow.db in the working directory."""
    experiment: str = "dlm"
    run_name: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)
    """Extra MLflow run tags; `mlflow.parentRunId` nests the run under a parent (sweeps)."""


@dataclass
class LogTarget:
    """The MLflow run that `dlm bench`, `dlm eval` and `dlm drift` log into."""

    mlflow_run: Optional[str] = None
    """Run id to log into (bench also takes `auto`: the run that trained the checkpoint); none: no
    logging."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI (default: sqlite:///mlflow.db)."""
