"""LoRA through peft: wrap a backbone for conversion, fold the adapters back in, load an
adapter-only folder.

The [MASK] embedding row is a peft *trainable token* (the AR model never saw the token, so a frozen
random row would be the one input the adapters must work around); it is saved with an adapter-only
export even when frozen, because a resized embedding's new row is drawn at random and could not be
rebuilt at load.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from dlm.models.backbone import Backbone, load_backbone
from dlm.settings import ConfigError, LoraConfig, ModelConfig
from dlm.settings.lora import ALL_LINEAR

# imported where LoRA is used: a model without adapters loads and trains without peft
if TYPE_CHECKING:
    import peft

ADAPTER_FILE = "adapter_config.json"


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def _module_name(model: PreTrainedModel, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def linear_names(model: PreTrainedModel) -> list[str]:
    """Suffixes of the model's linear layers that can carry adapters (the LM head is trained in full
    or not)."""
    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def check_targets(model: PreTrainedModel, targets: list[str]) -> None:
    """Unknown target modules fail in one line naming the ones the model has (peft's error lists
    none)."""
    if list(targets) == [ALL_LINEAR]:
        return
    known = linear_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ConfigError(f"model.lora.target_modules={list(targets)}: "
                          f"{', '.join(unknown)} not a linear layer of {type(model).__name__}; "
                          f"allowed: {', '.join(known)}, {ALL_LINEAR}")


def peft_config(cfg: LoraConfig, model: PreTrainedModel, mask_token_id: int) -> peft.LoraConfig:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embed = _module_name(model, model.get_input_embeddings())
    head = _module_name(model, model.get_output_embeddings())
    # the tied head *is* the embedding matrix, [MASK] row included
    whole_matrix = cfg.train_lm_head and tied
    if whole_matrix and not cfg.train_mask_embedding:
        raise ConfigError("model.lora.train_mask_embedding=false: with tied embeddings, "
                          "model.lora.train_lm_head trains the whole embedding matrix, "
                          "[MASK] row included; set one of them differently")
    targets = ALL_LINEAR if list(cfg.target_modules) == [ALL_LINEAR] else list(cfg.target_modules)
    import peft

    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        bias="none", modules_to_save=[head] if cfg.train_lm_head else None,
        ensure_weight_tying=whole_matrix,
        trainable_token_indices=None if whole_matrix else {embed: [mask_token_id]},
    )


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, mask_token_id: int) -> peft.PeftModel:
    """`model` with adapters on `cfg.target_modules`; everything else frozen except what `cfg`
    trains."""
    import peft

    check_targets(model, cfg.target_modules)
    wrapped = peft.get_peft_model(model, peft_config(cfg, model, mask_token_id))
    if not cfg.train_mask_embedding:
        for name, p in wrapped.named_parameters():
            if "trainable_tokens_delta" in name:
                p.requires_grad_(False)  # kept (and saved) at its initial value
    return wrapped


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters: what the optimizer updates vs what the forward runs."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged_copy(model: peft.PeftModel) -> PreTrainedModel:
    """A plain HF model with the adapters folded in; the training model is left as it is."""
    return copy.deepcopy(model).merge_and_unload()


def load_adapter(path: str | Path, *, base_model: str, mask_token: str,
                 attn_implementation: str = "sdpa", dtype: str = "float32") -> Backbone:
    """Base model + adapter folder -> one merged backbone (the tokenizer, with [MASK], comes from
    `path`)."""
    cfg = ModelConfig(name_or_path=base_model, tokenizer=str(path), mask_token=mask_token,
                      dtype=dtype)
    try:
        base = load_backbone(cfg, attn_implementation=attn_implementation)
    except ConfigError as err:
        raise ConfigError(f"checkpoint={str(path)!r}: adapter-only, and its base model "
                          f"{base_model!r} does not load ({err})") from None
    import peft

    model = peft.PeftModel.from_pretrained(base.model, str(path)).merge_and_unload()
    return Backbone(model, base.tokenizer, base.mask_token_id)
