"""Settings for training at scale: FSDP sharding (`trainer.fsdp.*`) and `dlm plan`
(memory and time per GPU).

The GPU table is small on purpose: memory and dense bf16 peak of the cards the presets target.
A card missing here is one `--gpu-memory-gib`/`--gpu-tflops` pair away.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Optional

from dlm.settings.errors import check

ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"]
FSDPDtype = Literal["auto", "float32", "bfloat16", "float16"]
SHARDING_STRATEGIES = typing.get_args(ShardingStrategy)

GPUS: dict[str, tuple[float, float]] = {
    # name: (memory GiB, dense bf16 peak TFLOP/s without sparsity, from the vendors' data sheets)
    "h100-80gb": (80.0, 989.0),
    "h100-pcie": (80.0, 756.0),
    "h200": (141.0, 989.0),
    "a100-80gb": (80.0, 312.0),
    "a100-40gb": (40.0, 312.0),
    "l40s": (48.0, 362.0),
}


@dataclass
class FSDPConfig:
    """How `trainer.strategy: fsdp` shards: one FSDP unit per decoder layer (the backbone's
    `_no_split_modules` class), the rest (embeddings, final norm, head) in the root unit."""

    sharding_strategy: ShardingStrategy = "FULL_SHARD"
    """FULL_SHARD (ZeRO-3) |
    SHARD_GRAD_OP (ZeRO-2: parameters stay gathered from forward to backward) |
    HYBRID_SHARD (full shard inside a node, replicas across nodes) | NO_SHARD (DDP-like)."""
    param_dtype: FSDPDtype = "auto"
    """Dtype the gathered parameters compute in;
    auto: from `trainer.precision` (Lightning's rule)."""
    reduce_dtype: FSDPDtype = "auto"
    """Dtype of the gradient reduce-scatter; auto: from `trainer.precision`."""
    buffer_dtype: FSDPDtype = "auto"
    """Dtype of buffers (rotary inverse frequencies); auto: from `trainer.precision`."""
    cpu_offload: bool = False
    """Keep sharded parameters and gradients in host memory between uses
    (slower, less GPU memory)."""
    state_dict_type: Literal["full", "sharded"] = "full"
    """Lightning checkpoints: one gathered file (`full`) or one shard per rank
    (`sharded`, faster at 8B)."""


@dataclass
class PlanConfig:
    """`dlm plan`: per-GPU memory, FLOPs per token and wall time of a config,
    computed without weights."""

    gpu: str = "h100-80gb"
    """A card of the table in dlm/settings/scaling.py (memory and bf16 peak)."""
    gpu_memory_gib: Optional[float] = None
    """Override the table's memory per GPU (GiB)."""
    gpu_tflops: Optional[float] = None
    """Override the table's dense peak TFLOP/s per GPU."""
    mfu: float = 0.4
    """Assumed model FLOPs utilisation for tokens/s and wall time
    (0.3-0.5 is typical for FSDP at 8B)."""
    headroom: float = 0.9
    """Fraction of the card's memory a plan may use
    (allocator fragmentation, CUDA context, NCCL buffers)."""
    architectures: Optional[str] = None
    """Folder of architecture configs (`<org>--<name>.json`);
    none: `architectures/` next to the config file."""

    def __post_init__(self) -> None:
        known = self.gpu in GPUS
        custom = self.gpu_memory_gib is not None and self.gpu_tflops is not None
        check(known or custom, "plan.gpu", self.gpu,
              "unknown GPU (or give --gpu-memory-gib and --gpu-tflops)", sorted(GPUS))
        for key in ("gpu_memory_gib", "gpu_tflops"):
            value = getattr(self, key)
            check(value is None or value > 0, f"plan.{key}", value, "must be > 0")
        check(0 < self.mfu <= 1, "plan.mfu", self.mfu, "must be in (0, 1]")
        check(0 < self.headroom <= 1, "plan.headroom", self.headroom, "must be in (0, 1]")

    @property
    def memory_bytes(self) -> float:
        return (self.gpu_memory_gib or GPUS[self.gpu][0]) * 2**30

    @property
    def peak_flops(self) -> float:
        return (self.gpu_tflops or GPUS[self.gpu][1]) * 1e12
