"""What makes `resume=true` exact and its MLflow record clean.

Exactness: the train loader's position is Lightning's (torchdata's `StatefulDataLoader` in the fit
loop's state), the data noise has its own generator saved by the DataModule (`state_dict`), and the
global torch RNG, which dropout draws from, is saved by the LightningModule (`on_save_checkpoint`,
see `rng_state`). So a run killed at any step and resumed from its last checkpoint repeats the steps
after that checkpoint bit for bit.

The record: those repeated steps were already logged before the kill. MLflow keeps every (key, step,
value) point it is given: there is no API to replace or delete one metric point (only whole runs are
deleted), so a re-logged step would show twice in the history and in the UI's charts.
`ResumedMLFlowLogger` therefore drops metric points at steps the run already holds for that key
(with an exact resume they carry the same values), and the run gets a `dlm.resumed` tag saying from
which step it resumed and which steps were not logged again.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from lightning.pytorch.loggers import MLFlowLogger

RESUMED_TAG = "dlm.resumed"


def rng_state() -> dict[str, Any]:
    """The global torch RNG (CPU and every CUDA device): what dropout draws from."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    restorable = "cuda" in state and torch.cuda.is_available()
    if restorable and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumedMLFlowLogger(MLFlowLogger):
    """An `MLFlowLogger` continuing a run: metric points at steps the run already has are not logged
    again."""

    def __init__(self, *args: Any, logged_until: Mapping[str, int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logged_until = dict(logged_until or {})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            metrics = {k: v for k, v in metrics.items() if step > self.logged_until.get(k, -1)}
        if metrics:
            super().log_metrics(metrics, step)


def logged_steps(tracking_uri: str, run_id: str) -> dict[str, int]:
    """Metric key -> the last step the run holds for it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = client.get_run(run_id).data.metrics
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1)
            for k in keys}


def mark_resumed(logger: MLFlowLogger, from_step: int, logged_until: Mapping[str, int]) -> None:
    """The `dlm.resumed` tag: each resume appends
    `from step S (steps S..M re-run, not logged again)`; metric step S is the (S+1)-th optimizer
    step, the first one after a checkpoint taken at global step S."""
    last = logged_until.get("train/loss", max(logged_until.values(), default=from_step - 1))
    rerun = f" (steps {from_step}..{last} re-run, not logged again)" if last >= from_step else ""
    note = f"from step {from_step}" + rerun
    run = logger.experiment.get_run(logger.run_id)
    earlier = run.data.tags.get(RESUMED_TAG)
    logger.experiment.set_tag(logger.run_id, RESUMED_TAG, f"{earlier}; {note}" if earlier else note)
