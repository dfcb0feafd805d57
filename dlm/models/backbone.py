"""Load or build an unmodified HF causal LM + tokenizer, give it a [MASK] token, run it under a
pattern.

A source is a hub id, an HF folder, or a `.gguf` file: transformers reads GGUF (with the `gguf`
package), and dlm asks it to dequantize to a plain dense model, so training, saving and decoding
treat it like any other checkpoint.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dlm.settings import ConfigError, ModelConfig
from dlm.tensor.attention import HF_IMPLEMENTATION, AttentionInputs

BUILTIN_TOKENIZER = "builtin:tiny"
"""`model.tokenizer` value for the offline BPE trained on the synthetic task (dlm.tokenizer)."""


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.name_or_path
    if source == BUILTIN_TOKENIZER:
        from dlm.models.tokenizer import tiny_tokenizer

        return tiny_tokenizer()
    if source is None:
        raise ConfigError("model.tokenizer=None: a from-scratch model needs a tokenizer; "
                          f"allowed: a folder, a hub id, {BUILTIN_TOKENIZER}")
    # blame the key that named the source
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    return _from_pretrained(AutoTokenizer, source, cfg, key=key)


def load_backbone(cfg: ModelConfig, *, attn_implementation: str = "sdpa") -> Backbone:
    """Model + tokenizer + mask token id. `attn_implementation` is a dlm backend name
    (sdpa, flex, ...)."""
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, attn_implementation=attn_implementation)
    mask_id = ensure_mask_token(model, tokenizer, cfg.mask_token)
    return Backbone(model, tokenizer, mask_id)


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *,
               attn_implementation: str = "sdpa") -> PreTrainedModel:
    """The model `cfg` names (a hub id, folder or `.gguf` file) or builds from scratch, as it is:
    no [MASK]."""
    hf_impl = HF_IMPLEMENTATION.get(attn_implementation, attn_implementation)
    dtype = getattr(torch, cfg.dtype)
    if cfg.name_or_path is None:
        return build_model(cfg, tokenizer, attn_implementation=hf_impl, dtype=dtype)
    return _from_pretrained(AutoModelForCausalLM, cfg.name_or_path, cfg, key="model.name_or_path",
                            attn_implementation=hf_impl, dtype=dtype)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, attn_implementation: str,
                dtype: torch.dtype) -> PreTrainedModel:
    """A randomly initialised model of HF type `cfg.arch` sized by `cfg.config` (tiny CPU
    models)."""
    try:
        config = AutoConfig.for_model(cfg.arch, **dict(cfg.config))
    except ValueError:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        raise ConfigError(f"model.arch={cfg.arch!r}: unknown HF model type; "
                          "e.g. qwen3, qwen2, llama, mistral "
                          f"({len(CONFIG_MAPPING)} known)") from None
    # The tokenizer's size, or a larger `vocab_size` given in `cfg.config` (padded like Qwen's
    # real-shape heads).
    config.vocab_size = max(len(tokenizer), int(cfg.config.get("vocab_size", 0)))
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                            dtype=dtype)


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def _from_pretrained(auto_cls, source: str, cfg: ModelConfig, *, key: str, **kwargs):
    local = Path(source).expanduser()
    if local.is_dir():
        check_weight_files(local, key=key)
    if is_gguf(local):
        return _from_gguf(auto_cls, local, cfg, key=key, **kwargs)
    try:
        return auto_cls.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{key}={source!r}: this checkpoint needs its own modeling code; "
                "set model.trust_remote_code=true to run it "
                "(that executes code from the checkpoint)"
            ) from None
        raise ConfigError(f"{key}={source!r}: cannot load "
                          f"({type(err).__name__}: {_first_line(err)})") from None
    except LOAD_ERRORS as err:
        raise ConfigError(f"{key}={source!r}: cannot load ({_first_line(err)}); "
                          "allowed: a local HF folder or a reachable hub id") from None


def _from_gguf(auto_cls, path: Path, cfg: ModelConfig, *, key: str, **kwargs):
    """A GGUF file's tokenizer, or its model dequantized to a dense one in float32 (then cast to
    `dtype`): a model left quantized cannot train, and transformers refuses to save one loaded from
    GGUF."""
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such .gguf file")
    try:
        if auto_cls is AutoTokenizer:
            return auto_cls.from_pretrained(str(path.parent), gguf_file=path.name)
        from transformers import GgufConfig

        dtype = kwargs.pop("dtype", torch.float32)
        dequantize = GgufConfig(dequantize=True)
        loaded = auto_cls.from_pretrained(str(path.parent), gguf_file=path.name,
                                          dtype=torch.float32, quantization_config=dequantize,
                                          **kwargs)
    except LOAD_ERRORS + (ImportError,) as err:
        raise ConfigError(f"{key}={str(path)!r}: cannot read this GGUF file "
                          f"({_first_line(err)}); "
                          "transformers reads GGUF with the `gguf` package installed") from None
    return dense_copy(loaded).to(dtype)


def dense_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built from its config without `quantization_config`, so it saves
    and trains as a plain checkpoint."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    implementation = model.config._attn_implementation
    dense = AutoModelForCausalLM.from_config(config, attn_implementation=implementation,
                                             dtype=model.dtype)
    dense.load_state_dict(model.state_dict())
    dense.generation_config = model.generation_config
    return dense


LOAD_ERRORS = (ValueError, OSError, EOFError, RuntimeError, SafetensorError, pickle.UnpicklingError)
"""What loading corrupt, truncated or pickled files raises (JSONDecodeError is a ValueError)."""


def check_weight_files(folder: Path, *, key: str) -> None:
    """Every weight file in `folder` readable before anything loads: safetensors headers cover their
    files (a truncated file fails here), and `.bin` files open with `weights_only=True`, so a
    pickled payload is refused instead of run."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except LOAD_ERRORS as err:
            raise _corrupt(folder, path, err, key) from None
    for path in sorted(folder.glob("*.bin")):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise ConfigError(f"{key}={str(folder)!r}: {path.name} refused: it holds pickled "
                              f"objects, which could run code ({pickle_refusal(err)})") from None
        except LOAD_ERRORS as err:
            raise _corrupt(folder, path, err, key) from None


def pickle_refusal(err: BaseException) -> str:
    """The line of torch's `weights_only` refusal that names what the file tried to load."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines
             if "Unsupported global" in line or "Unsupported operand" in line]
    reason = (named or lines or [type(err).__name__])[0]
    return "torch.load(weights_only=True): " + reason.split(" was not an allowed global")[0][:160]


def _corrupt(folder: Path, path: Path, err: BaseException, key: str) -> ConfigError:
    return ConfigError(f"{key}={str(folder)!r}: {path.name} is truncated or corrupt "
                       f"({_first_line(err)})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def ensure_mask_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      mask_token: str) -> int:
    """Id of `mask_token`, adding it (and growing the embeddings) when the vocabulary lacks it.

    Embeddings only grow: Qwen checkpoints pad their embedding matrix past the tokenizer's length,
    and shrinking it to `len(tokenizer)` would drop trained rows.
    """
    if tokenizer.mask_token != mask_token:
        if mask_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [mask_token]})
        tokenizer.mask_token = mask_token
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    rows = model.get_input_embeddings().weight.shape[0]
    if mask_id >= rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return mask_id


def forward_logits(model: PreTrainedModel, input_ids: Tensor, attn: AttentionInputs,
                   **kwargs) -> Tensor:
    """Logits `(B, T, V)` of `input_ids` `(B, T)` under the mask and position ids in `attn`."""
    return model(input_ids=input_ids, **attn.as_kwargs(), use_cache=False, **kwargs).logits
