"""HF-format dlm checkpoints: `save_pretrained` model + tokenizer + `dlm.yaml`, written atomically.

`dlm.yaml` holds what a later command needs to run the model the way it was trained (pattern, block
size, mask token, shift), so `dlm generate/eval/bench` and plain transformers load the same folder.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlm.models.backbone import Backbone, load_backbone
from dlm.settings import ConfigError, ExperimentConfig, ModelConfig

META_FILE = "dlm.yaml"


@dataclass
class CheckpointMeta:
    pattern: str
    block_size: int
    mask_token: str
    mask_token_id: int
    shift: bool = False
    source_experiment: str = ""
    base_model: str = ""
    """The `model.name_or_path` this model was trained from (the AR checkpoint a conversion started from):
    `dlm bench`'s default AR baseline. Empty for a model built from scratch."""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, mask_token_id: int) -> "CheckpointMeta":
        return cls(cfg.attention.pattern, cfg.attention.block_size, cfg.model.mask_token, mask_token_id,
                   cfg.objective.shift, cfg.name, cfg.model.name_or_path or "")


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    meta: CheckpointMeta,
    out_dir: str | Path,
    *,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write to `<out_dir>.partial`, then rename; an existing folder is kept as `<out_dir>.prev-<time>`.

    A kill mid-write leaves only a `.partial` folder, never a half checkpoint under the final name.
    `state_dict` lets a sharded (FSDP) run pass the gathered full weights.
    """
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict)
    tokenizer.save_pretrained(partial)
    (partial / META_FILE).write_text(yaml.safe_dump(asdict(meta), sort_keys=False))
    if out.exists():
        out.rename(out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}"))
    partial.rename(out)
    return out


def read_meta(path: str | Path) -> CheckpointMeta:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ConfigError(f"checkpoint={str(path)!r}: no {META_FILE}; "
                          "not a dlm checkpoint (dlm train exports one to <output_dir>/final)")
    fields = yaml.safe_load(meta_path.read_text()) or {}
    try:
        return CheckpointMeta(**fields)
    except TypeError as err:
        raise ConfigError(f"checkpoint={str(path)!r}: bad {META_FILE} ({err})") from None


def load_checkpoint(path: str | Path, *, attn_implementation: str = "sdpa",
                    dtype: str = "float32") -> tuple[Backbone, CheckpointMeta]:
    """A dlm checkpoint folder -> (backbone, meta); fails in one line if `dlm.yaml` is missing."""
    meta = read_meta(path)
    cfg = ModelConfig(name_or_path=str(path), mask_token=meta.mask_token, dtype=dtype)
    return load_backbone(cfg, attn_implementation=attn_implementation), meta
