"""HF-format dlm checkpoints: `save_pretrained` model + tokenizer + `dlm.yaml`, written atomically.

`dlm.yaml` holds what a later command needs to run the model the way it was trained (pattern, block
size, mask token, shift), so `dlm generate/eval/bench` and plain transformers load the same folder.
A LoRA run exports either such a folder with the adapters merged, or (`model.lora.export: adapter`)
only the peft adapter, whose `dlm.yaml` names the base model; :func:`load_checkpoint` loads both.
Any plain HF causal LM (a folder with `config.json` and no `dlm.yaml`, a hub id, a `.gguf` file) is
an AR checkpoint too: :func:`read_meta` gives it a causal meta, so every slot that takes an AR model
takes it.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlm.models.backbone import Backbone, check_weight_files, is_gguf, load_backbone
from dlm.models.lora import is_adapter_folder, load_adapter
from dlm.settings import CLEAN_CONTEXTS, PATTERNS, ConfigError, ExperimentConfig, ModelConfig, check
from dlm.settings.errors import check_positive_int
from dlm.settings.loading import read_yaml_mapping
from dlm.tensor import patterns
from dlm.tensor.patterns import Pattern

META_FILE = "dlm.yaml"


@dataclass
class CheckpointMeta:
    pattern: str
    block_size: int
    mask_token: str
    mask_token_id: int | None
    """None: the vocabulary has no [MASK] yet (an imported AR model); loading adds it."""
    shift: bool = False
    source_experiment: str = ""
    base_model: str = ""
    """The `model.name_or_path` this model was trained from (absolute folder, or hub id): the AR
    checkpoint a conversion started from (`dlm bench`'s default AR baseline) and the base a LoRA
    adapter-only export applies to. Empty for a model built from scratch."""
    clean_context: str = "block"
    """`attention.clean_context` of training: `causal` makes the clean KV cache an AR model's, which
    `decode.mode=speculative` verifies with."""
    chat_template: str = ""
    """The Jinja chat template the training data was rendered with (`data.chat_template`); generate,
    eval and bench render prompts through it. Empty: prompts are raw text."""
    system_prompt: str | None = None
    """The system turn of that rendering (None: the template's own default)."""
    source: str = ""
    """What `dlm import` read (a GGUF file, HF folder or hub id), or the checkpoints `dlm average`
    averaged; empty for a trained checkpoint."""
    pattern_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """`attention.options` of training (a pattern's own options, e.g. a window)."""

    def __post_init__(self) -> None:
        """Validated like a config: a checkpoint whose dlm.yaml says `pattern: bogus` must not
        decode as if valid."""
        check(self.pattern in PATTERNS, "pattern", self.pattern, "unknown pattern", PATTERNS)
        check(isinstance(self.pattern_options, dict), "pattern_options", self.pattern_options,
              "must be a mapping")
        check_positive_int("block_size", self.block_size)
        check(isinstance(self.mask_token, str) and self.mask_token != "", "mask_token",
              self.mask_token, "must be a non-empty string")
        is_id = isinstance(self.mask_token_id, int) and not isinstance(self.mask_token_id, bool)
        check(self.mask_token_id is None or (is_id and self.mask_token_id >= 0), "mask_token_id",
              self.mask_token_id, "must be a token id >= 0 (or null: added at load)")
        check(isinstance(self.shift, bool), "shift", self.shift, "must be true or false")
        check(isinstance(self.source_experiment, str), "source_experiment", self.source_experiment,
              "must be a string")
        check(isinstance(self.base_model, str), "base_model", self.base_model, "must be a string")
        check(self.clean_context in CLEAN_CONTEXTS, "clean_context", self.clean_context,
              "unknown clean context", CLEAN_CONTEXTS)
        check(isinstance(self.chat_template, str), "chat_template", self.chat_template,
              "must be a string")
        check(self.system_prompt is None or isinstance(self.system_prompt, str), "system_prompt",
              self.system_prompt, "must be a string or null")
        check(isinstance(self.source, str), "source", self.source, "must be a string")
        # its options and clean context are checked by building it
        self.attention_pattern  # noqa: B018

    @property
    def attention_pattern(self) -> Pattern:
        """The pattern the model was trained with, at its training block size: what decoding and
        scoring ask."""
        return patterns.get(self.pattern, block_size=self.block_size,
                            clean_context=self.clean_context, options=self.pattern_options)

    @classmethod
    def causal(cls, *, source: str = "", mask_token: str = "<|mask|>") -> "CheckpointMeta":
        """The meta of a plain AR model: pattern causal, no [MASK] until loading adds one."""
        return cls("causal", 1, mask_token, None, source=source)

    def check_decode_mode(self, mode: str) -> None:
        """Speculative decoding verifies with the causal clean path, which only a causal clean
        context trains."""
        check(mode != "speculative" or self.attention_pattern.verifies, "decode.mode", mode,
              "needs a checkpoint trained with attention.clean_context=causal "
              f"(this one: pattern {self.pattern}, clean_context {self.clean_context}); "
              "allowed: diffusion, ar")

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, mask_token_id: int, *,
                    chat_template: str | None = None) -> "CheckpointMeta":
        """`chat_template`: the tokenizer's template, recorded when `data.chat_template` rendered
        the data."""
        base = ""
        if cfg.model.name_or_path:
            local = Path(cfg.model.name_or_path).expanduser()
            base = str(local.resolve()) if local.exists() else cfg.model.name_or_path
        block_size = cfg.attention.block_size_at(cfg.trainer.max_steps)  # a schedule's last stage
        chat = (chat_template or "") if cfg.data.chat_template else ""
        return cls(cfg.attention.pattern, block_size, cfg.model.mask_token, mask_token_id,
                   cfg.objective.shift, cfg.name, base, cfg.attention.clean_context, chat,
                   cfg.data.system_prompt if chat else None,
                   pattern_options=dict(cfg.attention.options))


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    meta: CheckpointMeta,
    out_dir: str | Path,
    *,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write to `<out_dir>.partial`, then rename; an existing folder is kept as
    `<out_dir>.prev-<time>`.

    A kill mid-write leaves only a `.partial` folder, never a half checkpoint under the final name.
    `state_dict` lets a sharded (FSDP) run pass the gathered full weights.
    """
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(partial)
    (partial / META_FILE).write_text(yaml.safe_dump(asdict(meta), sort_keys=False))
    if out.exists():
        out.rename(_unused_prev_name(out))
    partial.rename(out)
    return out


def _unused_prev_name(out: Path) -> Path:
    """`<out>.prev-<time>`, with `-2`, `-3`, ... when an export in the same second already took that
    name."""
    stem = f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = out.with_name(stem), 1
    while candidate.exists():
        n += 1
        candidate = out.with_name(f"{stem}-{n}")
    return candidate


def read_meta(path: str | Path, *, quiet: bool = False) -> CheckpointMeta:
    """The checkpoint's dlm.yaml, every field checked (YAML errors, unknown or missing keys, wrong
    types); a plain HF causal LM (no dlm.yaml) gets :meth:`CheckpointMeta.causal`, with one line on
    stderr saying so."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        if not Path(path).expanduser().exists() and not is_plain_model(path):
            raise ConfigError(f"checkpoint={str(path)!r}: no such folder or file; "
                              "allowed: a dlm checkpoint folder, "
                              "a plain HF causal LM folder or hub id, a .gguf file")
        if not is_plain_model(path):
            raise ConfigError(f"checkpoint={str(path)!r}: no {META_FILE} and no config.json; "
                              "allowed: a dlm checkpoint (dlm train exports one to "
                              "<output_dir>/final), a plain HF causal LM folder or hub id, "
                              "a .gguf file")
        if not quiet:
            print(f"note: {path}: no {META_FILE}; used as a plain causal LM (pattern causal)",
                  file=sys.stderr)
        return CheckpointMeta.causal(source=str(path))
    where = f"checkpoint={str(path)!r}: {META_FILE}"
    fields = read_yaml_mapping(meta_path, label=f"checkpoint {META_FILE}")
    known = [f.name for f in dataclasses.fields(CheckpointMeta)]
    required = [f.name for f in dataclasses.fields(CheckpointMeta)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in fields:
        check(key in known, f"{where} {key}", rule="unknown key", allowed=known)
    for key in required:
        check(key in fields, f"{where} {key}", rule="required")
    try:
        return CheckpointMeta(**fields)
    except ConfigError as err:
        raise ConfigError(f"{where} {err}") from None


def is_plain_model(path: str | Path) -> bool:
    """A folder with an HF `config.json`, a `.gguf` file, or a name that is no local path
    (a hub id)."""
    local = Path(path).expanduser()
    if local.exists():
        return (local.is_dir() and (local / "config.json").is_file()) or is_gguf(local)
    text = str(path)
    looks_local = (text.startswith((".", "/", "~"))
                   or local.parent.is_dir() and str(local.parent) != ".")
    # Qwen/Qwen2.5-0.5B has a "suffix"
    return not looks_local and text.count("/") == 1 and not is_gguf(local)


def check_checkpoint(path: str | Path) -> CheckpointMeta:
    """A checkpoint's dlm.yaml and weight files checked without loading a model (commands call it
    first)."""
    meta = read_meta(path)
    if Path(path).is_dir():
        check_weight_files(Path(path), key="checkpoint")
    return meta


def load_checkpoint(path: str | Path, *, attn_implementation: str = "sdpa",
                    dtype: str = "float32") -> tuple[Backbone, CheckpointMeta]:
    """A dlm checkpoint folder (full, or a LoRA adapter over its base), or a plain HF causal LM ->
    (backbone, meta); fails in one line when it is neither."""
    meta = read_meta(path, quiet=True)
    if is_adapter_folder(path):
        return load_adapter(path, base_model=meta.base_model, mask_token=meta.mask_token,
                            attn_implementation=attn_implementation, dtype=dtype), meta
    if Path(path).is_dir():
        check_weight_files(Path(path), key="checkpoint")
    cfg = ModelConfig(name_or_path=str(path), mask_token=meta.mask_token, dtype=dtype)
    return load_backbone(cfg, attn_implementation=attn_implementation), meta
