"""The planner against measurement: peak memory of one real training step on this CPU vs
`dlm plan`'s estimate.

CPU torch keeps no allocator statistics, so the measure is the process's resident-set high-water
mark (`VmHWM`, reset through `/proc/self/clear_refs`) above the resident set once the backbone, data
and Trainer exist, plus the parameters' own bytes: gradients, AdamW state and activations of the
steps, and parameters.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from dlm.data.datamodule import DiffusionDataModule
from dlm.models.backbone import BUILTIN_TOKENIZER, load_backbone
from dlm.planning.plan import Plan, plan
from dlm.settings import ConfigError, ExperimentConfig
from dlm.settings.scaling import PlanConfig
from dlm.training.module import DiffusionLM, kernel_for
from dlm.training.scaling import enable_activation_checkpointing

CPU = PlanConfig(gpu="cpu", gpu_memory_gib=1e6, gpu_tflops=1.0)


@dataclass
class PlanCheck:
    name: str
    params: int
    planned: float  # bytes
    measured: float  # bytes

    @property
    def error(self) -> float:
        return self.planned / self.measured - 1


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ConfigError(f"/proc/self/status: no {field}; the measured check needs Linux")


def _reset_peak() -> int:
    """Return freed heap to the OS and restart the high-water mark; the resident bytes now."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def cpu_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` as one CPU process trains it: one device, no sharding, a from-scratch backbone if the
    checkpoint it names is not there."""
    trainer = dataclasses.replace(cfg.trainer, accelerator="cpu", devices=1, num_nodes=1,
                                  strategy="auto", accumulate_grad_batches=1, max_steps=2,
                                  progress_bar=False)
    model = cfg.model
    if model.name_or_path and not Path(model.name_or_path).is_dir() and model.arch:
        model = dataclasses.replace(model, name_or_path=None,
                                    tokenizer=model.tokenizer or BUILTIN_TOKENIZER)
    return dataclasses.replace(cfg, trainer=trainer, model=model)


def measure_step(cfg: ExperimentConfig) -> float:
    """Bytes of the parameters (exact) + the resident-set growth over two training steps.

    The high-water mark restarts once the module, data and Trainer exist, so the process's fixed
    cost (imports, tokenized data, Lightning's objects) is left out and what remains is what the
    plan counts.
    """
    module = DiffusionLM(cfg, load_backbone(cfg.model, attn_implementation=kernel_for(cfg)))
    if cfg.trainer.activation_checkpointing:
        enable_activation_checkpointing(module.model)
    data = DiffusionDataModule(cfg, module.tokenizer, module.mask_token_id)
    data.prepare_data()
    data.setup("fit")
    trainer = L.Trainer(max_steps=2,  # the second step holds the AdamW state created by the first
                        accelerator="cpu", devices=1, precision=cfg.trainer.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=cfg.optim.grad_clip or None)
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    base = _reset_peak()
    trainer.fit(module, datamodule=data)
    return _status_kib("VmHWM") * 1024 - base + params


def check_plan(cfg: ExperimentConfig, *, config_dir: Path) -> PlanCheck:
    cfg = cpu_config(cfg)
    planned: Plan = plan(cfg, CPU, config_dir=config_dir, device="cpu")
    return PlanCheck(cfg.name, planned.params, planned.total, measure_step(cfg))


def format_check(c: PlanCheck) -> str:
    return (f"{c.name} ({c.params / 1e6:.1f}M parameters), CPU training steps: planned "
            f"{c.planned / 2**20:,.0f} MiB, measured peak {c.measured / 2**20:,.0f} MiB "
            f"({c.error:+.0%})")
