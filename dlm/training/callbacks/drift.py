"""Log how far the decoder weights move from the initial AR weights while converting (Efficient-DLM
Fig. 2e, 4).

A diagnostic, so it never stops a run: any failure is one warning, after which the callback stays
quiet.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dlm.measurement.drift import DriftReport, drift_plot, load_weights, snapshot, weight_drift
from dlm.settings import ConfigError

log = logging.getLogger(__name__)
PLOT_NAME = "weight_drift.png"


class WeightDriftCallback(L.Callback):
    """Every `every_n_steps` optimizer steps (0: only at the end) and at train end, on rank 0, log
    `drift/layer_<i>/{attention,mlp}` and `drift/{attention,mlp}_mean`
    (`dlm.measurement.drift.weight_drift`) at the global step; at train end draw
    `<default_root_dir>/weight_drift.png` and log it as an MLflow artifact.

    Reference: the folder `reference` (a local HF model) when given. Otherwise a CPU copy of the
    decoder attention/MLP weights taken in `setup`, which Lightning runs before it restores a
    resumed checkpoint: the copy is the weights the module was built with (the AR checkpoint
    `model.name_or_path`, or the seeded from-scratch init) on a fresh and a resumed run alike,
    without reading that checkpoint again, and it works for hub ids too. It costs CPU memory the
    size of those weights, on rank 0 only.
    Skipped under sharded strategies (FSDP, DeepSpeed): rank 0 alone does not hold the full weights.
    """

    def __init__(self, every_n_steps: int = 0, log_plot: bool = True, *,
                 reference: str | Path | None = None) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ConfigError(f"drift.every_n_steps={every_n_steps!r}: "
                              "must be an integer >= 0 (0: only at train end)")
        self.every_n_steps, self.log_plot, self.reference = every_n_steps, log_plot, reference
        self._reference: dict[str, Tensor] | None = None
        self._last_step, self._report = -1, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        if _sharded(trainer):
            rank_zero_warn(f"WeightDriftCallback: off under {type(trainer.strategy).__name__} "
                           "(weights are sharded)")
            return
        try:
            self._reference = (load_weights(self.reference, key="reference") if self.reference
                               else snapshot(_model(pl_module)))
        except Exception as err:  # a bad reference must not end a training run
            self._fail("reading the reference weights", err)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._log_drift(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_drift(trainer, pl_module)
        if self.log_plot and self._report is not None:
            try:
                self._log_plot(trainer, pl_module, self._report)
            except Exception as err:
                self._fail("drawing or logging the plot", err)

    def _log_drift(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Once per global step (batch end fires per micro-batch under gradient accumulation)."""
        if self._reference is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        try:
            self._report = weight_drift(_model(pl_module), self._reference)
        except Exception as err:
            self._fail(f"computing drift at step {trainer.global_step}", err)
            return
        for logger in trainer.loggers:
            logger.log_metrics(self._report.as_metrics(), step=trainer.global_step)

    def _log_plot(self, trainer: L.Trainer, pl_module: L.LightningModule,
                  report: DriftReport) -> None:
        name = getattr(getattr(pl_module, "cfg", None), "name", "") or "run"
        path = drift_plot({name: report}, Path(trainer.default_root_dir) / PLOT_NAME)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(path))

    def _fail(self, doing: str, err: Exception) -> None:
        """Warn once and switch off: a failure here (a mismatched reference) would repeat every
        time."""
        rank_zero_warn(f"WeightDriftCallback: {doing} failed, drift is off and training goes on: "
                       f"{type(err).__name__}: {err}")
        log.debug("drift failure", exc_info=True)
        self._reference, self._report = None, None  # no plot of a stale report either


def _model(pl_module: L.LightningModule) -> nn.Module:
    """The HF model (`DiffusionLM.model`); any other module is read whole."""
    return getattr(pl_module, "model", pl_module)


def _sharded(trainer: L.Trainer) -> bool:
    return any(name in type(trainer.strategy).__name__ for name in ("FSDP", "DeepSpeed"))
