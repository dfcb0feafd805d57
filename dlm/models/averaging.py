"""`dlm average`: the uniform weight average of checkpoints of one lineage (LAWA, model soups).

A run at a constant learning rate in bf16 ends where the last steps' noise left it; the mean of
checkpoints along the run (or of consecutive continuations) sits nearer the basin's centre, which a
cosine cool-down would reach, but bf16-true drops updates below a weight's resolution. Averaging
costs no training step. The sources must decode the same way (the `dlm.yaml` fields below) and have
the same parameters; the mean is taken in float32, one source loaded at a time, and written in the
first source's stored dtype (or `dtype`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from dlm.models.backbone import load_model, load_tokenizer
from dlm.models.checkpoint import META_FILE, CheckpointMeta, check_checkpoint, save_checkpoint
from dlm.models.lora import is_adapter_folder
from dlm.settings import DTYPES, ModelConfig, check
from dlm.settings.experiment import Dtype

SHARED_FIELDS = ("pattern", "block_size", "mask_token", "mask_token_id", "shift", "clean_context",
                 "chat_template", "system_prompt", "pattern_options")
"""`dlm.yaml` fields every source must agree on: how the average is decoded."""


def average_checkpoints(sources: Sequence[str | Path], out: str | Path, *,
                        dtype: Dtype | None = None) -> Path:
    """Write the mean of `sources`' weights to `out` (atomically; an existing folder is kept as
    `<out>.prev-<time>`) with the first source's tokenizer and `dlm.yaml`; return `out`."""
    metas = _check_sources(sources, out, dtype)
    dtype = dtype or _stored_dtype(sources[0])
    model, tokenizer = _load(sources[0])
    total = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for source in sources[1:]:
        other = _load(source)[0].state_dict()
        check(other.keys() == total.keys()
              and all(other[k].shape == total[k].shape for k in total), "source", str(source),
              f"its parameters differ from {sources[0]}'s", "checkpoints of one architecture")
        for name, tensor in other.items():
            total[name] += tensor
        del other
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(total[name] / len(sources))
    model.to(getattr(torch, dtype))
    names = ", ".join(str(Path(s).resolve()) if Path(s).exists() else str(s) for s in sources)
    meta = dataclasses.replace(metas[0], source=f"average of {len(sources)}: {names}")
    return save_checkpoint(model, tokenizer, meta, out)


def _load(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The source in float32, as saved: a dlm checkpoint's vocabulary holds its [MASK] already, and
    a plain AR folder gets none (as `dlm import` writes it), so the mean keeps the vocabulary."""
    cfg = ModelConfig(name_or_path=str(source), dtype="float32")
    tokenizer = load_tokenizer(cfg)
    return load_model(cfg, tokenizer), tokenizer


def _check_sources(sources: Sequence[str | Path], out: str | Path,
                   dtype: Dtype | None) -> list[CheckpointMeta]:
    """One-line errors before any weight loads: too few sources, an adapter-only export, the output
    among the sources, or sources that decode differently."""
    check(len(sources) >= 2, "sources", [str(s) for s in sources],
          "need at least two checkpoints to average")
    check(dtype is None or dtype in DTYPES, "--dtype", dtype, "unknown weight dtype", DTYPES)
    out_path = Path(out).resolve()
    metas = []
    for source in sources:
        check(not is_adapter_folder(source), "source", str(source),
              "a LoRA adapter-only export", "full checkpoints (export with adapters merged)")
        check(Path(source).resolve() != out_path, "out", str(out),
              "one of the sources", "a new folder")
        metas.append(check_checkpoint(source))
    for source, meta in zip(sources[1:], metas[1:]):
        for field in SHARED_FIELDS:
            first = getattr(metas[0], field)
            check(getattr(meta, field) == first, "source", str(source),
                  f"its {META_FILE} {field} is {getattr(meta, field)!r}, {sources[0]}'s {first!r}",
                  "checkpoints that decode the same way")
    return metas


def _stored_dtype(source: str | Path) -> Dtype:
    """The dtype the source's HF config records for its saved weights (float32 when none)."""
    dtype = str(AutoConfig.from_pretrained(source).dtype or "float32").removeprefix("torch.")
    return dtype if dtype in DTYPES else "float32"
