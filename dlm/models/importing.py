"""`dlm import`: any causal LM source (a GGUF file, an HF folder, a hub id) written once as a plain
HF folder.

GGUF files are dequantized at every load (~16 s for a 135M model) and need the `gguf` package; a hub
id needs the network. Importing once gives a safetensors folder that loads in about a second,
offline, with a `dlm.yaml` saying it is an AR model (pattern causal) and where it came from. The
folder holds the model as it is: no [MASK] token is added (a conversion adds it when it loads the
folder), so plain transformers `generate` on it is the original model's.
"""

from __future__ import annotations

from pathlib import Path

from dlm.models.backbone import is_gguf, load_model, load_tokenizer
from dlm.models.checkpoint import META_FILE, CheckpointMeta, read_meta, save_checkpoint
from dlm.settings import DTYPES, ModelConfig, check
from dlm.settings.experiment import Dtype


def import_model(source: str, out: str | Path, *, dtype: Dtype = "float32") -> Path:
    """Write `source` to `out` (atomically; an existing folder is kept as `<out>.prev-<time>`) and
    return it."""
    check(dtype in DTYPES, "--dtype", dtype, "unknown weight dtype", DTYPES)
    out = Path(out)
    if (Path(source) / META_FILE).is_file():
        pattern = read_meta(source).attention_pattern
        check(pattern.autoregressive, "source", source,
              f"a dlm checkpoint of pattern {pattern.name}; "
              "importing would relabel it as an AR model; "
              "allowed: an AR model (GGUF file, HF folder, hub id, causal dlm checkpoint)")
        check(Path(source).resolve() != out.resolve(), "out", str(out),
              "the source itself; allowed: another folder")
    local = Path(source).expanduser()
    recorded = str(local.resolve()) if local.exists() else source
    if is_gguf(local):
        recorded += " (GGUF, dequantized)"
    cfg = ModelConfig(name_or_path=source, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    meta = CheckpointMeta.causal(source=recorded, mask_token=cfg.mask_token)
    return save_checkpoint(model, tokenizer, meta, out)
