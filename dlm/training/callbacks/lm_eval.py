"""lm-eval on the in-memory model during training; `eval/<task>/<metric>` goes to the trainer's
loggers."""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger

from dlm.evaluation.evaluate import metrics_from_results, run_lm_eval, write_results
from dlm.evaluation.lm_eval_model import DLMEvalModel
from dlm.evaluation.tasks import prepare_tasks
from dlm.models.backbone import Backbone
from dlm.models.checkpoint import CheckpointMeta
from dlm.settings import EvalConfig
from dlm.settings.errors import check_positive_int
from dlm.training.callbacks.throughput import decoding_mode

log = logging.getLogger(__name__)


class LmEvalCallback(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training), evaluate `tasks` with
    lm-eval.

    Runs on rank 0 on the module's own model (no reload from disk), in eval mode and with a
    dense-mask attention kernel (sdpa) for the duration, then restores both. An evaluation error is
    logged and training continues; bad settings (unknown task, missing data) fail in `setup`, before
    the first step. lm-eval reseeds the global RNGs, so their states are restored afterwards:
    training noise does not depend on whether evaluation ran. Under FSDP the weights are sharded
    across ranks and a rank-0-only forward would hang, so the callback skips there (with a warning);
    use `dlm eval` on the export.

    `gsm8k_synthetic` reads the synthetic data of the run's own config (`data.synthetic_size`, ...)
    unless `task_metadata` says otherwise. `settings` are `dlm eval`'s (tasks, limit, decode, ...).
    Example: ``LmEvalCallback(EvalConfig(tasks=["gsm8k_synthetic"], limit=50), every_n_steps=200)``.
    """

    def __init__(self, settings: EvalConfig, every_n_steps: int, *,
                 task_metadata: dict[str, Any] | None = None, at_train_end: bool = True) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        self.settings, self.every_n_steps = settings, every_n_steps
        self.task_metadata, self.at_train_end = task_metadata, at_train_end
        self._manager = None
        self._runs: dict[str, str] = {}
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the tasks once (fails here, before training, on bad names or missing data)."""
        if trainer.is_global_zero and self._manager is None:
            metadata = {**_data_metadata(pl_module), **(self.task_metadata or {})}
            self._manager, self._runs = prepare_tasks(self.settings.tasks,
                                                      data_dir=self.settings.data_dir,
                                                      task_metadata=metadata)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           *args: Any) -> None:
        # optimizer steps: stays put across gradient-accumulation micro-batches
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._run(trainer, pl_module)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if "fsdp" in type(trainer.strategy).__name__.lower():
            log.warning("LmEvalCallback: skipped under %s (sharded weights); "
                        "evaluate the export with dlm eval", type(trainer.strategy).__name__)
            return
        try:
            results = self.evaluate(pl_module)
        except Exception:  # noqa: BLE001 -- an eval failure must not end a training run
            log.exception("LmEvalCallback: evaluation at step %d failed; training continues", step)
            return
        name = f"results_step{step:06d}.json"
        path = write_results(results, Path(trainer.default_root_dir) / "eval" / name)
        for logger in trainer.loggers:
            logger.log_metrics(results["dlm_metrics"], step=step)
            # the results JSON (and samples, under log_samples) beside the metrics
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(path), "lm_eval")

    def evaluate(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """lm-eval on `pl_module.model` as it is now; lm-eval's results, with `eval/<task>/<metric>`
        values under `results["dlm_metrics"]`."""
        model = pl_module.model
        meta = CheckpointMeta.from_config(pl_module.cfg, pl_module.mask_token_id,
                                         chat_template=pl_module.tokenizer.chat_template)
        e = self.settings
        backbone = Backbone(model, pl_module.tokenizer, pl_module.mask_token_id)
        lm = DLMEvalModel(backbone=backbone, meta=meta, decode=e.decode_overrides(),
                          batch_size=e.batch_size, loglikelihood=e.loglikelihood,
                          mc_num=e.mc_num, seed=e.seed)
        with decoding_mode(model), _kept_rng_state():  # the decoder and scorer pass 4-D masks
            results = run_lm_eval(lm, list(self._runs.values()), task_manager=self._manager,
                                  settings=self.settings)
        names = {run: name for name, run in self._runs.items()}
        results["dlm_metrics"] = metrics_from_results(results, names)
        return results


def _data_metadata(pl_module: L.LightningModule) -> dict[str, Any]:
    """The run's synthetic-data settings, so `gsm8k_synthetic` scores its held-out split."""
    data = getattr(getattr(pl_module, "cfg", None), "data", None)
    if data is None:
        return {}
    return {"synthetic_size": data.synthetic_size,
            "synthetic_max_number": data.synthetic_max_number, "cache_dir": data.cache_dir}


@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    """lm-eval seeds random, numpy and torch globally; give training its own streams back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
