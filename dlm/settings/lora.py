"""`model.lora`: LoRA conversion through peft instead of full training
(Efficient-DLM App. F ablates it)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import List, Literal

from dlm.settings.errors import check, check_positive_int

LoraExport = Literal["merged", "adapter"]
LORA_EXPORTS = typing.get_args(LoraExport)
ALL_LINEAR = "all-linear"
"""peft's shorthand for every linear layer but the LM head."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) on a frozen backbone instead of every weight."""
    rank: int = 8
    """LoRA rank r (Efficient-DLM App. F: r = 64 ends 7.6 points below full training)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / rank) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get adapters (module-name suffixes), or ['all-linear']."""
    train_mask_embedding: bool = True
    """Train the [MASK] token's embedding row (peft trainable tokens):
    the AR model never learned it."""
    train_lm_head: bool = False
    """Train the LM head in full (with tied embeddings that is the whole embedding matrix)."""
    export: LoraExport = "merged"
    """merged: a plain HF folder with the adapters folded in |
    adapter: only the adapter + dlm.yaml, which names the base model it applies to."""


def check_lora(cfg: LoraConfig, *, name_or_path: str | None, strategy: str) -> None:
    """The rules that need no model;
    unknown target modules are checked against the model at load."""
    if not cfg.enabled:
        return
    check_positive_int("model.lora.rank", cfg.rank)
    check(cfg.alpha > 0, "model.lora.alpha", cfg.alpha, "must be > 0")
    check(0 <= cfg.dropout < 1, "model.lora.dropout", cfg.dropout, "must be in [0, 1)")
    check(len(cfg.target_modules) > 0, "model.lora.target_modules", list(cfg.target_modules),
          "name at least one module", "e.g. q_proj, v_proj, or all-linear")
    check(cfg.export != "adapter" or name_or_path is not None, "model.lora.export", cfg.export,
          "an adapter needs a base model to apply to; "
          "set model.name_or_path (a from-scratch base is random)",
          LORA_EXPORTS)
    check("fsdp" not in strategy, "trainer.strategy", strategy, "LoRA runs do not shard yet",
          "auto, ddp")
