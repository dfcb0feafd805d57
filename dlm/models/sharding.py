"""The unit of sharding and of activation checkpointing: the backbone's own decoder-layer class.

HF models name the modules that must not be split across devices in `_no_split_modules` (for Qwen2,
Qwen3 and Llama: their decoder layer). Sharding per such module gathers one layer's parameters at a
time instead of the whole model, and checkpointing per layer keeps only each layer's input.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from dlm.settings import ConfigError


def decoder_layer_classes(model: PreTrainedModel) -> set[type[nn.Module]]:
    """The classes named by `model._no_split_modules` that occur in `model` (a peft wrapper is
    looked through)."""
    names = set(_no_split_names(model))
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(f"model={type(model).__name__}: no decoder-layer class to shard or "
                          f"checkpoint per layer (_no_split_modules={sorted(names)}); "
                          "allowed: HF models that name theirs")
    return found


def _no_split_names(model: nn.Module) -> list[str]:
    for module in model.modules():  # the first PreTrainedModel (a peft model wraps one)
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The decoder-layer modules of `model`, in order."""
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]
