"""`dlm train`: build backbone, data, module, MLflow logger and Lightning Trainer from one config, then fit.

Bad input fails before compute (config validation, data path checks) and nothing already written is
lost: an output folder that holds checkpoints is only continued with `resume=true`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import Strategy

from dlm.data.datamodule import DiffusionDataModule
from dlm.settings import ConfigError, ExperimentConfig, flatten, to_yaml
from dlm.tracking import runs
from dlm.training.callbacks.export import HFExportCallback
from dlm.training.module import DiffusionLM
from dlm.training.scaling import build_strategy, enable_activation_checkpointing, is_fsdp


@dataclass
class TrainResult:
    final_dir: Path
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]


def tracking_uri(cfg: ExperimentConfig) -> str:
    return runs.resolve_uri(cfg.tracking.tracking_uri)


def _resume_state(cfg: ExperimentConfig) -> tuple[str | None, str | None]:
    """(checkpoint to resume from, MLflow run id to continue), refusing to overwrite a previous run."""
    out = Path(cfg.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    if not cfg.resume:
        if last.exists():
            raise ConfigError(f"output_dir={cfg.output_dir!r}: holds checkpoints of an earlier run; "
                              "set resume=true to continue it, or pick another name/output_dir")
        return None, None
    saved = runs.read_run_file(out)
    run_id = saved["run_id"] if saved else None
    return (str(last) if last.exists() else None), run_id


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_logger(cfg: ExperimentConfig, run_id: str | None) -> MLFlowLogger:
    return MLFlowLogger(experiment_name=cfg.tracking.experiment, run_name=cfg.tracking.run_name or cfg.name,
                        tracking_uri=tracking_uri(cfg), run_id=run_id, log_model=False,
                        tags=dict(cfg.tracking.tags) or None)


def _log_run_info(logger: MLFlowLogger, cfg: ExperimentConfig, resumed: bool) -> None:
    """Params, config artifact and git commit; once per run (MLflow forbids changing a param)."""
    out = Path(cfg.output_dir)
    runs.write_run_file(out, logger.run_id, tracking_uri(cfg))
    if resumed:
        return
    logger.log_hyperparams(flatten(cfg))
    config_path = out / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    logger.experiment.log_artifact(logger.run_id, str(config_path))
    commit = _git_commit()
    if commit:
        logger.experiment.set_tag(logger.run_id, "mlflow.source.git.commit", commit)


def build_trainer(cfg: ExperimentConfig, logger: MLFlowLogger, callbacks: list[L.Callback] = (),
                  strategy: str | Strategy | None = None) -> L.Trainer:
    """`strategy`: a configured Lightning strategy (FSDP per decoder layer); default `trainer.strategy`."""
    t, out = cfg.trainer, Path(cfg.output_dir)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=t.checkpoint_every_n_steps,
                                  save_last=True, save_top_k=1)
    throughput = ThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                   length_fn=lambda b: b["input_ids"].numel(), separator="/",
                                   window_size=t.throughput_window)
    return L.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=strategy or t.strategy, precision=t.precision, gradient_clip_val=cfg.optim.grad_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches, val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, logger=logger, default_root_dir=str(out),
        inference_mode=False,  # validate() before fit(): inference tensors would poison training buffers
        callbacks=[checkpoints, throughput, LearningRateMonitor("step"), HFExportCallback(out / "final"), *callbacks],
    )


def train(cfg: ExperimentConfig, callbacks: list[L.Callback] = ()) -> TrainResult:
    """Fit `cfg` and export `<output_dir>/final`. Extra callbacks (eval, bench) are appended."""
    ckpt_path, run_id = _resume_state(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DiffusionLM(cfg)
    if cfg.trainer.activation_checkpointing and not is_fsdp(cfg):  # under FSDP the strategy's policy does it
        enable_activation_checkpointing(module.model)
    data = DiffusionDataModule(cfg, module.tokenizer, module.mask_token_id)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg, run_id)
    trainer = build_trainer(cfg, logger, list(callbacks), strategy=build_strategy(cfg, module.model))
    if trainer.is_global_zero:
        _log_run_info(logger, cfg, resumed=run_id is not None)
    if ckpt_path is None:  # the starting point of the loss curve (val/loss at step 0)
        trainer.validate(module, datamodule=data, verbose=False)
        if trainer.is_global_zero:  # validate() finalized the run as FINISHED; training is still to come
            logger.experiment.update_run(logger.run_id, status="RUNNING")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return TrainResult(Path(cfg.output_dir) / "final", logger.run_id, tracking_uri(cfg), metrics)
