"""Helpers shared by test modules: the small model shape, a fast tiny-run config, a simulated crash, and a
random tiny AR checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from dlm.models.backbone import load_backbone
from dlm.models.checkpoint import CheckpointMeta, save_checkpoint
from dlm.settings import ModelConfig

SMALL_MODEL = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
               "model.config.num_attention_heads=2", "model.config.num_key_value_heads=1", "model.config.head_dim=16"]


def small_overrides(tmp_path: Path, **kw: str) -> list[str]:
    base = {"output_dir": f"{tmp_path}/out", "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "data.cache_dir": f"{tmp_path}/data", "data.synthetic_size": "400", "data.max_length": "32",
            "data.batch_size": "4", "trainer.max_steps": "6", "trainer.val_every_n_steps": "3",
            "trainer.limit_val_batches": "2", "trainer.checkpoint_every_n_steps": "3", "trainer.log_every_n_steps": "1",
            "trainer.progress_bar": "false", "trainer.throughput_window": "2", "trainer.accelerator": "cpu",
            "trainer.devices": "1"}
    return [f"{k}={v}" for k, v in (base | kw).items()] + SMALL_MODEL


class CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def save_tiny_ar(path: Path) -> Path:
    """A random AR checkpoint with the SMALL_MODEL shape and the offline tokenizer (what tiny.yaml converts)."""
    if (path / "dlm.yaml").is_file():
        return path
    dims = dict(o.split("=") for o in SMALL_MODEL)
    config = {k.removeprefix("model.config."): int(v) for k, v in dims.items()} | {"max_position_embeddings": 256}
    torch.manual_seed(0)
    bb = load_backbone(ModelConfig(arch="qwen3", config=config, tokenizer="builtin:tiny"))
    return save_checkpoint(bb.model, bb.tokenizer, CheckpointMeta("causal", 4, "<|mask|>", bb.mask_token_id), path)
