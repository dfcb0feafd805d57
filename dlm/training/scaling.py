"""Scale the backbone: FSDP sharded per decoder layer and activation checkpointing per decoder
layer.

Both use the libraries' own mechanisms: Lightning's `FSDPStrategy` (torch FSDP1,
`FullyShardedDataParallel`) with the decoder-layer class as the auto-wrap and checkpointing policy;
without FSDP, transformers' `activation_checkpointing_enable` (non-reentrant
`torch.utils.checkpoint` per layer, which passes the 4-D mask or flex BlockMask through to the
recomputed layer unchanged).

Two FSDPs: `trainer.strategy: fsdp` is Lightning's `FSDPStrategy`, i.e. torch FSDP1 (GPU only: both
Lightning and torch's FSDP1 refuse a CPU-only run); `trainer.strategy: fsdp2` is Lightning's
`ModelParallelStrategy` with torch FSDP2 (`fully_shard`, DTensor parameters) applied per decoder
layer in `DiffusionLM.configure_model`, which also runs on CPU over gloo.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from transformers import PreTrainedModel

from dlm.models.sharding import decoder_layer_classes, decoder_layers
from dlm.settings import ExperimentConfig
from dlm.settings.scaling import FSDPConfig


def is_fsdp(cfg: ExperimentConfig) -> bool:
    """FSDP1, whose checkpointing is Lightning's policy (FSDP2 checkpoints through transformers)."""
    return cfg.trainer.strategy == "fsdp"


def build_strategy(cfg: ExperimentConfig, model: PreTrainedModel) -> str | Strategy:
    """`trainer.strategy` as Lightning takes it: a configured FSDPStrategy for `fsdp`,
    ModelParallelStrategy for `fsdp2` (sharding applied by :func:`shard_per_layer`), else the
    name."""
    gloo = None if torch.cuda.is_available() else "gloo"
    if cfg.trainer.strategy == "fsdp2":
        data_parallel = "auto" if cfg.trainer.num_nodes > 1 else _devices(cfg)
        sharded = cfg.trainer.fsdp.state_dict_type == "sharded"
        return ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=1,
                                     process_group_backend=gloo,
                                     save_distributed_checkpoint=sharded)
    if not is_fsdp(cfg):
        return cfg.trainer.strategy
    layers = decoder_layer_classes(model)
    f = cfg.trainer.fsdp
    return FSDPStrategy(
        auto_wrap_policy=layers,
        activation_checkpointing_policy=layers if cfg.trainer.activation_checkpointing else None,
        sharding_strategy=f.sharding_strategy,
        mixed_precision=mixed_precision(f, cfg.trainer.precision),
        cpu_offload=f.cpu_offload, state_dict_type=f.state_dict_type,
        process_group_backend=gloo,
    )


def _devices(cfg: ExperimentConfig) -> int | str:
    d = cfg.trainer.devices
    return d if isinstance(d, int) else "auto"


def shard_per_layer(model: PreTrainedModel, mesh: Any, cfg: ExperimentConfig) -> None:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, norm, head), on the
    data-parallel mesh."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    # Lightning calls configure_model again for fit after validate
    if isinstance(model, FSDPModule):
        return
    f = cfg.trainer.fsdp
    mp = mixed_precision(f, cfg.trainer.precision)
    reshard = f.sharding_strategy != "SHARD_GRAD_OP"
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard}
    if mp is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp.param_dtype,
                                                   reduce_dtype=mp.reduce_dtype)
    if f.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def mixed_precision(f: FSDPConfig, precision: str) -> Any:
    """torch's `MixedPrecision` when any `trainer.fsdp.*_dtype` is set; None leaves Lightning's rule
    (every dtype from `trainer.precision`)."""
    dtypes = {"param_dtype": f.param_dtype, "reduce_dtype": f.reduce_dtype,
              "buffer_dtype": f.buffer_dtype}
    if all(v == "auto" for v in dtypes.values()):
        return None
    from torch.distributed.fsdp import MixedPrecision

    default = {"32-true": "float32", "32": "float32", "64-true": "float64"}.get(
        precision, "float16" if precision.startswith("16") else "bfloat16")
    return MixedPrecision(**{k: getattr(torch, default if v == "auto" else v)
                             for k, v in dtypes.items()})


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Per-decoder-layer recomputation through transformers (the non-FSDP path).

    Non-reentrant: the reentrant variant drops gradients of inputs that do not require grad and
    cannot take the mask object as a keyword argument.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
