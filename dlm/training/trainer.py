"""`dlm train`: build backbone, data, module, MLflow logger and Lightning Trainer from one config,
then fit. With `tracking.enabled=false` Lightning's CSVLogger takes the MLflow logger's place (no
mlflow needed).

Bad input fails before compute (config validation, data path checks) and nothing already written is
lost: an output folder that holds checkpoints is only continued with `resume=true`.
"""

from __future__ import annotations

import subprocess
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from lightning.pytorch.strategies import Strategy

from dlm.data.datamodule import DiffusionDataModule
from dlm.settings import ConfigError, ExperimentConfig, flatten, to_yaml
from dlm.tensor import patterns
from dlm.tracking import lock, runs
from dlm.training.callbacks.export import (
    HFExportCallback,
    StepExportCallback,
    export_complete,
    export_module,
)
from dlm.training.module import DiffusionLM
from dlm.training.preflight import (
    check_model_source,
    check_packed_data,
    check_raw_data,
    check_tracking,
    check_trainer,
    read_resume_checkpoint,
)
from dlm.training.resume import ResumedMLFlowLogger, logged_steps, mark_resumed
from dlm.training.scaling import build_strategy, enable_activation_checkpointing, is_fsdp


@dataclass
class TrainResult:
    final_dir: Path
    run_id: str
    """The MLflow run; "" with tracking.enabled=false (the metrics are in
    `<output_dir>/metrics/metrics.csv`)."""
    tracking_uri: str
    metrics: dict[str, float]


def tracking_uri(cfg: ExperimentConfig) -> str:
    return runs.resolve_uri(cfg.tracking.tracking_uri)


def _resume_state(cfg: ExperimentConfig) -> tuple[str | None, str | None, int]:
    """(checkpoint to resume from, MLflow run id to continue, the checkpoint's global step),
    refusing to overwrite a previous run; the checkpoint is opened once here (weights_only=True), so
    a bad one fails before any load."""
    out = Path(cfg.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    if not cfg.resume:
        if last.exists():
            raise ConfigError(f"output_dir={cfg.output_dir!r}: "
                              "holds checkpoints of an earlier run; "
                              "set resume=true to continue it, or pick another name/output_dir")
        return None, None, 0
    saved = runs.read_run_file(out)
    run_id = saved["run_id"] if saved else None
    if not last.exists():
        return None, run_id, 0
    step = int(read_resume_checkpoint(last).get("global_step", 0))
    return str(last), run_id, step


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_logger(cfg: ExperimentConfig, run_id: str | None, *, resumed: bool = False) -> Logger:
    """MLflow logger; continuing a run from a checkpoint, it skips the steps the run already holds
    (`resume.py`). Tracking off: a CSVLogger writing `<output_dir>/metrics/metrics.csv`."""
    if not cfg.tracking.enabled:
        return CSVLogger(cfg.output_dir, name="", version="metrics")
    logged = logged_steps(tracking_uri(cfg), run_id) if resumed and run_id else {}
    return ResumedMLFlowLogger(experiment_name=cfg.tracking.experiment,
                               run_name=cfg.tracking.run_name or cfg.name,
                               tracking_uri=tracking_uri(cfg), run_id=run_id, log_model=False,
                               tags=dict(cfg.tracking.tags) or None, logged_until=logged)


def _log_run_info(logger: Logger, cfg: ExperimentConfig, resumed: bool) -> None:
    """Params, config artifact and git commit; once per run (MLflow forbids changing a param)."""
    out, mlflow = Path(cfg.output_dir), isinstance(logger, MLFlowLogger)
    if mlflow:
        runs.write_run_file(out, logger.run_id, tracking_uri(cfg))
    if resumed:
        return
    logger.log_hyperparams(flatten(cfg))
    config_path = out / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    if not mlflow:
        return
    logger.experiment.log_artifact(logger.run_id, str(config_path))
    commit = _git_commit()
    if commit:
        logger.experiment.set_tag(logger.run_id, "mlflow.source.git.commit", commit)


def build_trainer(cfg: ExperimentConfig, logger: Logger, callbacks: list[L.Callback] = (),
                  strategy: str | Strategy | None = None) -> L.Trainer:
    """`strategy`: a configured Lightning strategy (FSDP per decoder layer); default
    `trainer.strategy`."""
    t, out = cfg.trainer, Path(cfg.output_dir)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints",
                                  every_n_train_steps=t.checkpoint_every_n_steps,
                                  save_last=True, save_top_k=1)
    exports: list[L.Callback] = [HFExportCallback(out / "final")]
    if t.export_every_n_steps:
        exports.append(StepExportCallback(out / "steps", t.export_every_n_steps))
    throughput = ThroughputMonitor(batch_size_fn=lambda b: b.input_ids.shape[0],
                                   length_fn=lambda b: b.input_ids.numel(), separator="/",
                                   window_size=t.throughput_window)
    return L.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=strategy or t.strategy, precision=t.precision,
        gradient_clip_val=cfg.optim.grad_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches, val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, logger=logger, default_root_dir=str(out),
        # validate() before fit(): inference tensors would poison training buffers
        inference_mode=False,
        callbacks=[checkpoints, throughput, LearningRateMonitor("step"), *exports, *callbacks],
    )


def train(cfg: ExperimentConfig, callbacks: list[L.Callback] = ()) -> TrainResult:
    """Fit `cfg` and export `<output_dir>/final`. Extra callbacks (eval, bench) are appended.

    Order: every check that can fail on bad input (trainer knobs, the resume checkpoint, the data),
    then the model, the packed data, the output folder's lock, and only then the MLflow run and the
    first file.
    """
    patterns.check_experiment(cfg)
    check_trainer(cfg)
    check_tracking(cfg)
    ckpt_path, run_id, ckpt_step = _resume_state(cfg)
    check_model_source(cfg.model)
    check_raw_data(cfg.data)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DiffusionLM(cfg)
    # under FSDP the strategy's policy does it
    if cfg.trainer.activation_checkpointing and not is_fsdp(cfg):
        enable_activation_checkpointing(module.model)
    data = DiffusionDataModule(cfg, module.tokenizer, module.mask_token_id)
    check_packed_data(data)
    out = Path(cfg.output_dir)
    with _owning(out):
        trained = ckpt_path is not None and ckpt_step >= cfg.trainer.max_steps
        if trained and not export_complete(out / "final"):
            return _finish_export(cfg, module, ckpt_path, run_id)
        return _fit(cfg, module, data, ckpt_path, run_id, list(callbacks), ckpt_step)


def _owning(out: Path):
    """The output folder's lock (rank 0 only: the other ranks of one run share the folder)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        return lock.folder_lock(out, f"output_dir={str(out)!r}")
    return nullcontext()


def _fit(cfg: ExperimentConfig, module: DiffusionLM, data: DiffusionDataModule,
         ckpt_path: str | None, run_id: str | None, callbacks: list[L.Callback],
         ckpt_step: int = 0) -> TrainResult:
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg, run_id, resumed=ckpt_path is not None)
    trainer = build_trainer(cfg, logger, callbacks, strategy=build_strategy(cfg, module.model))
    mlflow = isinstance(logger, MLFlowLogger)
    if trainer.is_global_zero:
        _log_run_info(logger, cfg, resumed=run_id is not None)
        if ckpt_path is not None and run_id is not None and mlflow:
            mark_resumed(logger, ckpt_step, logger.logged_until)
    # the starting point of the loss curve (val/loss at step 0)
    if ckpt_path is None:
        trainer.validate(module, datamodule=data, verbose=False)
        # validate() finalized the run as FINISHED; training is still to come
        if trainer.is_global_zero and mlflow:
            logger.experiment.update_run(logger.run_id, status="RUNNING")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    final = Path(cfg.output_dir) / "final"
    if trainer.is_global_zero and not export_complete(final):
        raise RuntimeError(f"training ended without the export {final}; "
                           "re-run with resume=true to write it")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if torch.is_tensor(v) and v.numel() == 1}
    return TrainResult(final, logger.run_id if mlflow else "", tracking_uri(cfg), metrics)


def _finish_export(cfg: ExperimentConfig, module: DiffusionLM, ckpt_path: str,
                   run_id: str | None) -> TrainResult:
    """Training already reached max_steps (a kill during the export, or one right after the last
    checkpoint): Lightning would skip the finished loop and with it `on_train_end`, so write the
    export from `last.ckpt` here, log it into the same run and end that run FINISHED."""
    from lightning.pytorch.utilities import rank_zero_only

    final, uri = Path(cfg.output_dir) / "final", tracking_uri(cfg)
    # one writer; the other ranks of a multi-process launch have nothing to do
    if rank_zero_only.rank != 0:
        return TrainResult(final, run_id or "", uri, {})
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    path = export_module(module, final, state)
    if run_id is None or not cfg.tracking.enabled:
        return TrainResult(path, "", uri, {})
    client = runs.client(uri)
    # MLflow forbids changing a param
    if "final_checkpoint" not in client.get_run(run_id).data.params:
        client.log_param(run_id, "final_checkpoint", str(path.resolve()))
    client.set_terminated(run_id, "FINISHED")
    return TrainResult(path, run_id, uri, dict(client.get_run(run_id).data.metrics))
