"""Checks `dlm train` runs before it loads a model, creates an MLflow run or writes a file, so bad
input fails in one line: the Lightning knobs against Lightning's own registries, the checkpoint to
resume from (opened with `weights_only=True`: a pickled payload is refused, not run), and the raw
data (readable, not empty, has the columns the config names). What needs the tokenizer (data shorter
than `max_length`) is checked right after the model loads, still before any run exists
(`check_packed_data`).
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Any

import torch
from datasets import IterableDataset
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from dlm.data.datamodule import DiffusionDataModule
from dlm.data.sources import check_columns, column_names, load_raw
from dlm.models.backbone import pickle_refusal
from dlm.settings import ConfigError, DataConfig, ExperimentConfig, ModelConfig, check

ALIASES = {"gpu": "cuda"}


def check_tracking(cfg: ExperimentConfig) -> None:
    """An MLflow run needs mlflow installed; say so in one line instead of failing inside
    Lightning's logger."""
    check(not cfg.tracking.enabled or importlib.util.find_spec("mlflow") is not None,
          "tracking.enabled", cfg.tracking.enabled, "mlflow is not installed",
          ["false (metrics to <output_dir>/metrics/metrics.csv)"])


def check_trainer(cfg: ExperimentConfig) -> None:
    """`trainer.accelerator` and `trainer.strategy` are names Lightning knows, and the accelerator
    exists here."""
    t = cfg.trainer
    known = sorted(AcceleratorRegistry.available_accelerators())
    name = ALIASES.get(t.accelerator, t.accelerator)
    check(name == "auto" or name in known, "trainer.accelerator", t.accelerator,
          "unknown accelerator", ["auto", "gpu", *known])
    if name != "auto":
        check(_available(name), "trainer.accelerator", t.accelerator,
              "not available on this machine", ["auto", *[n for n in known if _available(n)]])
    # fsdp2: dlm.training.scaling
    strategies = ["auto", "fsdp2", *StrategyRegistry.available_strategies()]
    check(t.strategy in strategies, "trainer.strategy", t.strategy, "unknown strategy",
          ["auto", "ddp", "fsdp", "fsdp2", "deepspeed_stage_2",
           f"... ({len(strategies)} known)"])


def _available(accelerator: str) -> bool:
    try:
        return bool(AcceleratorRegistry[accelerator]["accelerator"].is_available())
    # e.g. tpu without torch_xla: not available, whatever the reason
    except Exception:
        return False


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """`last.ckpt` opened as Lightning will open it (`weights_only=True`, memory-mapped: tensors are
    not read); a corrupt, truncated or pickled file fails in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"resume: {str(path)!r} refused: it holds pickled objects, "
                          "which could run code "
                          f"({pickle_refusal(err)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(f"resume: {str(path)!r} is corrupt or truncated ({first}); "
                          "remove it to resume from an earlier checkpoint, "
                          "or set resume=false with a new output_dir") from None


def check_model_source(m: ModelConfig) -> None:
    """A local model or tokenizer folder that does not exist fails here, before the data is read or
    generated."""
    for key, source in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        # hub: org/name
        looks_local = source and (source.startswith((".", "/", "~")) or source.count("/") >= 2)
        if looks_local and source != "builtin:tiny" and not Path(source).expanduser().exists():
            raise ConfigError(f"{key}={source!r}: no such folder; "
                              "allowed: a local HF folder or a hub id")


def check_raw_data(d: DataConfig) -> None:
    """The data opens, has rows and has the columns the config names (before the tokenizer or model
    load)."""
    raw = load_raw(d, d.train_split)
    columns = column_names(raw)
    if not columns:
        raise ConfigError(f"data.path={d.path!r}: no rows in split {d.train_split!r}")
    check_columns(columns, d)
    if not isinstance(raw, IterableDataset) and not d.val_split:
        check(len(raw) >= 2, "data.path", d.path,
              f"{len(raw)} row(s) in split {d.train_split!r}; "
              "need at least 2 to hold out a validation split")


def check_packed_data(data: DiffusionDataModule) -> None:
    """Tokenize and pack now (cached: Lightning's own setup reuses the result), so data shorter than
    one `max_length` chunk fails before the run exists. A stream is only opened here and reopened
    per rank."""
    data.setup("fit")
    # each rank must read its own part of the stream, set up inside fit
    if data.cfg.data.streaming:
        data.train_set = data.val_set = None
