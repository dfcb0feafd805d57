"""Export the trained backbone as an HF dlm checkpoint when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from dlm.models.checkpoint import CheckpointMeta, save_checkpoint
from dlm.models.lora import merged_copy


class HFExportCallback(L.Callback):
    """`save_pretrained` model + tokenizer + dlm.yaml into `out_dir` (atomically) on rank 0.

    The state dict comes from the strategy, so sharded strategies (FSDP) export gathered full weights.
    A LoRA run exports a merged copy (default) or only the adapter (`model.lora.export: adapter`).
    The export path is logged to every logger as the hyperparameter `final_checkpoint`.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        full = trainer.strategy.lightning_module_state_dict()  # collective under FSDP: every rank calls it
        if not trainer.is_global_zero:
            return
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        meta = CheckpointMeta.from_config(pl_module.cfg, pl_module.mask_token_id)
        model, lora = pl_module.model, pl_module.cfg.model.lora
        if lora.enabled:  # unsharded (LoRA refuses FSDP at load): the module's own model is complete
            model, state = (model if lora.export == "adapter" else merged_copy(model)), None
        path = save_checkpoint(model, pl_module.tokenizer, meta, self.out_dir, state_dict=state)
        for logger in trainer.loggers:
            logger.log_hyperparams({"final_checkpoint": str(path.resolve())})
