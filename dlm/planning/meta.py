"""The backbone on the meta device and the activations a training step saves,
counted from its shapes.

The architecture comes from the config (a local HF folder, a shipped
`architectures/<org>--<name>.json` holding the hub model's `config.json` values, or `model.arch` +
`model.config`). Activations are counted, not guessed: one forward runs on meta tensors under
`saved_tensors_hooks`, which see every tensor autograd keeps for backward (deduplicated by storage,
weights left out). Attention runs through a stand-in registered with transformers'
`AttentionInterface` that saves what the fused kernels save (q, k, v, output, log-sum-exp, and for
SDPA the float mask): on meta, SDPA would fall back to the math kernel and count T x T scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from dlm.models.sharding import decoder_layers
from dlm.settings import ConfigError, ExperimentConfig
from dlm.tensor import patterns
from dlm.tensor.attention import build_attention_inputs


def architecture_file(name_or_path: str, folder: Path) -> Path:
    """`Qwen/Qwen3-8B-Base` -> `<folder>/Qwen--Qwen3-8B-Base.json`."""
    return folder / (name_or_path.replace("/", "--") + ".json")


def architecture_config(cfg: ExperimentConfig, folder: Path, *,
                        vocab_size: int | None = None) -> PretrainedConfig:
    """The HF config of the backbone `cfg` trains, without weights or network."""
    m = cfg.model
    if m.name_or_path is not None:
        local = Path(m.name_or_path) / "config.json"
        shipped = architecture_file(m.name_or_path, folder)
        for path in (local, shipped):
            if path.is_file():
                values = json.loads(path.read_text())
                return AutoConfig.for_model(values.pop("model_type"), **values)
        if m.arch is None:
            known = sorted(p.stem.replace("--", "/") for p in folder.glob("*.json"))
            raise ConfigError(f"model.name_or_path={m.name_or_path!r}: no architecture config "
                              f"(no local config.json, no {shipped}); "
                              f"allowed: {', '.join(known) or 'none shipped'}, or model.arch")
    try:
        config = AutoConfig.for_model(m.arch, **dict(m.config))
    except ValueError:
        raise ConfigError(f"model.arch={m.arch!r}: unknown HF model type; "
                          "e.g. qwen3, qwen2, llama") from None
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def meta_backbone(config: PretrainedConfig, *, dtype: torch.dtype, kernel: str) -> PreTrainedModel:
    """The unmodified HF model on the meta device (shapes only),
    its attention counted as `kernel` would."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=_register(kernel))
    return model.train()


@dataclass
class SavedActivations:
    """Bytes autograd keeps for backward in one forward of a micro-batch
    (the logits themselves excluded)."""

    per_layer: int  # one decoder layer
    layer_input: int  # one layer's input hidden state: all a checkpointed layer keeps
    outside: int  # embeddings, final norm, head input
    layers: int  # number of decoder layers


def count_saved(model: PreTrainedModel, cfg: ExperimentConfig, *,
                batch_size: int) -> SavedActivations:
    """Run the pattern's 2L (two halves) or L positions through the meta model
    and add up the saved tensors."""
    pattern, seq_len = patterns.of(cfg.attention), cfg.data.max_length
    positions = pattern.input_length(seq_len)
    attn = build_attention_inputs(pattern, batch_size=batch_size, seq_len=seq_len, backend="sdpa",
                                  device="meta")
    layers = decoder_layers(model)
    # saved by matmuls, counted as parameters
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, layer index or -1)
    where = [-1]

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved.setdefault(storage._cdata, (storage.nbytes(), where[0]))
        return t

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
        layer.register_forward_hook(lambda *_: where.__setitem__(0, -1))
    ids = torch.zeros(batch_size, positions, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, **attn.as_kwargs(), use_cache=False)
    in_layer = [b for b, i in saved.values() if i == 0]
    hidden = model.config.hidden_size * batch_size * positions * model.dtype.itemsize
    return SavedActivations(per_layer=sum(in_layer), layer_input=hidden,
                            outside=sum(b for b, i in saved.values() if i == -1),
                            layers=len(layers))


class _FusedAttention(torch.autograd.Function):
    """Shape-only attention that keeps for backward what flash / flex / CPU-flash SDPA keep."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = torch.empty_like(q)  # (B, nh, T, hd)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, nh, T)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


def _attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, *, dense: bool, **kwargs: Any) -> tuple[Tensor, None]:
    if dense:
        # transformers' sdpa path: GQA heads repeated when a mask is given;
        # the kernel keeps a float mask
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        mask = None if attention_mask is None else attention_mask.to(query.dtype)
    else:
        mask = None
    out = _FusedAttention.apply(query, key, value, mask)
    return out.transpose(1, 2).contiguous(), None  # (B, T, nh, hd)


def _register(kernel: str) -> str:
    dense = kernel in ("sdpa", "eager")
    name = "dlm_plan_dense" if dense else "dlm_plan_fused"
    AttentionInterface.register(name, lambda *a, **kw: _attention(*a, dense=dense, **kw))
    return name
