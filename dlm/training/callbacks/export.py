"""Export the trained backbone as an HF dlm checkpoint when training ends (and every N steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from dlm.models.checkpoint import META_FILE, CheckpointMeta, save_checkpoint
from dlm.models.lora import merged_copy


def export_complete(out_dir: Path) -> bool:
    """Whether `out_dir` is a finished export (`save_checkpoint` renames `.partial` only once all is
    written)."""
    return (out_dir / META_FILE).is_file()


def export_module(pl_module: L.LightningModule, out_dir: Path, full_state: dict[str, Any]) -> Path:
    """The LightningModule's backbone (`full_state`: its state dict, keys `model.*`) as an HF dlm
    folder."""
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
    meta = CheckpointMeta.from_config(pl_module.cfg, pl_module.mask_token_id,
                                     chat_template=pl_module.tokenizer.chat_template)
    model, lora = pl_module.model, pl_module.cfg.model.lora
    if lora.enabled:  # unsharded (LoRA refuses FSDP at load): the module's own model is complete
        model, state = (model if lora.export == "adapter" else merged_copy(model)), None
    return save_checkpoint(model, pl_module.tokenizer, meta, out_dir, state_dict=state)


class HFExportCallback(L.Callback):
    """`save_pretrained` model + tokenizer + dlm.yaml into `out_dir` (atomically) on rank 0.

    The state dict comes from the strategy, so sharded strategies (FSDP) export gathered full
    weights. A LoRA run exports a merged copy (default) or only the adapter
    (`model.lora.export: adapter`). The export path is logged to every logger as the hyperparameter
    `final_checkpoint`.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # collective under FSDP: every rank calls it
        full = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        path = export_module(pl_module, self.out_dir, full)
        for logger in trainer.loggers:
            logger.log_hyperparams({"final_checkpoint": str(path.resolve())})


class StepExportCallback(L.Callback):
    """An HF dlm folder `<out_dir>/step-NNNNNN` every `every` optimizer steps
    (`trainer.export_every_n_steps`).

    Why: a Lightning checkpoint holds optimizer state and keeps only the last; these folders are
    what `dlm average` (the mean along one run, LAWA), `dlm bench` and `dlm eval` read. A folder
    already complete (a resumed run passing the same step) is left as it is.
    """

    def __init__(self, out_dir: str | Path, every: int) -> None:
        self.out_dir, self.every = Path(out_dir), every
        self._last = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           *args: Any) -> None:
        step = trainer.global_step
        # with gradient accumulation this hook runs once per micro-batch; export once per step
        if step == 0 or step % self.every or step == self._last:
            return
        self._last = step
        target = self.out_dir / f"step-{step:06d}"
        if export_complete(target):
            return
        full = trainer.strategy.lightning_module_state_dict()  # collective under FSDP
        if trainer.is_global_zero:
            export_module(pl_module, target, full)
