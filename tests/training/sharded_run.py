"""A few training steps of the tiny model on fixed batches, single-process or sharded over CPU processes.

Run as a script (`python tests/training/sharded_run.py OUT.json STRATEGY DEVICES [key=value ...]`): Lightning
launches the extra ranks by re-running this command, so it cannot run inside pytest's own process.
Every rank gets `batch / devices` rows of the same global batches (all tokens eligible, so the per-rank
losses average to the global one); rank 0 writes the per-step global losses and the final weights' norm.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, default_collate

from dlm.data.batch import TrainBatch
from dlm.data.datamodule import DiffusionCollator
from dlm.settings import load_config
from dlm.training.module import DiffusionLM
from dlm.training.scaling import build_strategy, enable_activation_checkpointing, is_fsdp

GLOBAL_BATCH, LENGTH, STEPS = 4, 16, 3


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


class FixedRows(L.LightningDataModule):
    """Rank r of w takes rows r, r + w, ... in order (Lightning's own distributed sampler would shuffle)."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.rows = rows

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(self.rows[rank::world], batch_size=GLOBAL_BATCH // world, shuffle=False,
                          collate_fn=lambda rows: TrainBatch(**default_collate(rows)))


def fixed_rows(module: DiffusionLM) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches, noised once with a fixed seed, as rows (the loader re-batches them per rank)."""
    cfg = module.cfg
    collate = DiffusionCollator(module.pattern, module.mask_token_id, cfg.masking)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(STEPS):
        ids = torch.randint(0, module.model.config.vocab_size, (GLOBAL_BATCH, LENGTH), generator=gen)
        ids = torch.where(ids == module.mask_token_id, 0, ids)
        torch.manual_seed(len(rows))
        batch = collate([{"input_ids": r.tolist(), "eligible": [True] * LENGTH} for r in ids])
        fields = {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
        rows += [{k: v[i] for k, v in fields.items()} for i in range(GLOBAL_BATCH)]
    return rows


def main(out: str, strategy: str, devices: int, overrides: list[str]) -> None:
    cfg = load_config("experiments/tiny_ar.yaml", overrides=[
        "attention.pattern=block_clean", f"data.max_length={LENGTH}", f"trainer.strategy={strategy}",
        f"trainer.devices={devices}", "trainer.accelerator=cpu", *overrides])
    L.seed_everything(0, verbose=False)
    module = DiffusionLM(cfg)
    if cfg.trainer.activation_checkpointing and not is_fsdp(cfg):
        enable_activation_checkpointing(module.model)
    log = LossLog()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=devices, strategy=build_strategy(cfg, module.model),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[log], use_distributed_sampler=False)
    trainer.fit(module, datamodule=FixedRows(fixed_rows(module)))
    state = trainer.strategy.lightning_module_state_dict()
    norm = _norm(module.model)
    if trainer.is_global_zero:
        units = sum(isinstance(m, FSDPModule) for m in module.model.modules())
        json.dump({"losses": log.losses, "weight_norm": norm, "keys": sorted(state)[:3], "fsdp_units": units,
                   "wrapped": repr(type(trainer.strategy).__name__)}, open(out, "w"))


def _norm(model: torch.nn.Module) -> float:
    """L2 norm of the (unique) parameters, gathered where they are FSDP2 shards."""
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in full)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
