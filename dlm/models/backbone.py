"""Load or build an unmodified HF causal LM + tokenizer, give it a [MASK] token, run it under a pattern."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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
    return _from_pretrained(AutoTokenizer, source, cfg, key="model.tokenizer")


def load_backbone(cfg: ModelConfig, *, attn_implementation: str = "sdpa") -> Backbone:
    """Model + tokenizer + mask token id. `attn_implementation` is a dlm backend name (sdpa, flex, ...)."""
    tokenizer = load_tokenizer(cfg)
    hf_impl = HF_IMPLEMENTATION.get(attn_implementation, attn_implementation)
    dtype = getattr(torch, cfg.dtype)
    if cfg.name_or_path is not None:
        model = _from_pretrained(
            AutoModelForCausalLM, cfg.name_or_path, cfg, key="model.name_or_path", attn_implementation=hf_impl,
            dtype=dtype,
        )
    else:
        model = build_model(cfg, tokenizer, attn_implementation=hf_impl, dtype=dtype)
    mask_id = ensure_mask_token(model, tokenizer, cfg.mask_token)
    return Backbone(model, tokenizer, mask_id)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, attn_implementation: str,
                dtype: torch.dtype) -> PreTrainedModel:
    """A randomly initialised model of HF type `cfg.arch` sized by `cfg.config` (tiny CPU models)."""
    try:
        config = AutoConfig.for_model(cfg.arch, **dict(cfg.config))
    except ValueError:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        raise ConfigError(f"model.arch={cfg.arch!r}: unknown HF model type; "
                          f"e.g. qwen3, qwen2, llama, mistral ({len(CONFIG_MAPPING)} known)") from None
    config.vocab_size = max(len(tokenizer), int(cfg.config.get("vocab_size", 0)))  # a real shape may ask for more
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def _from_pretrained(auto_cls, source: str, cfg: ModelConfig, *, key: str, **kwargs):
    try:
        return auto_cls.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{key}={source!r}: this checkpoint needs its own modeling code; set model.trust_remote_code=true "
                "to run it (that executes code from the checkpoint)"
            ) from None
        raise
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}={source!r}: cannot load ({first}); "
                          "allowed: a local HF folder or a reachable hub id") from None


def ensure_mask_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mask_token: str) -> int:
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


def forward_logits(model: PreTrainedModel, input_ids: Tensor, attn: AttentionInputs, **kwargs) -> Tensor:
    """Logits `(B, T, V)` of `input_ids` `(B, T)` under the mask and position ids in `attn`."""
    return model(input_ids=input_ids, **attn.as_kwargs(), use_cache=False, **kwargs).logits
