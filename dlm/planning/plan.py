"""Memory per GPU, FLOPs per token and wall time of a training config, and a plain verdict.

Memory per GPU = parameters + gradients + AdamW state under the sharding (what each rank keeps), the
gathered FSDP units (root + the layer in use + the prefetched one), the saved activations of one
micro-batch (counted on the meta device, dlm/planning/meta.py) plus the loss's logits and the
backward working set, or the optimizer step's temporaries where those are larger. Gradients and
activations are both held: Lightning zeroes the previous step's gradients after the forward pass
(measured: counting only the larger of the two underestimated a 114M model's CPU peak by 24%).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.models.sharding import decoder_layers
from dlm.planning.meta import architecture_config, count_saved, meta_backbone
from dlm.settings import ConfigError, ExperimentConfig
from dlm.settings.scaling import PlanConfig
from dlm.tensor import patterns
from dlm.tensor.attention import dense_mask, resolve_backend

GIB = 2**30
KNOWN_STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2", "single_device")
FSDP = ("fsdp", "fsdp2")


@dataclass
class Plan:
    world: int
    params: int
    memory: dict[str, float]  # name -> bytes per GPU
    activations_plain: float  # bytes per micro-batch without checkpointing
    activations_checkpointed: float
    # model FLOPs per training token (6N + attention over the pattern's positions)
    flops_per_token: float
    tokens_per_s: float  # whole job, at the assumed MFU
    wall_s: float  # trainer.max_steps optimizer steps
    capacity: float  # usable bytes per GPU

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def world_size(cfg: ExperimentConfig) -> int:
    devices = cfg.trainer.devices
    devices = (1 if devices in ("auto", None, -1)
               else (len(devices) if isinstance(devices, list) else int(devices)))
    return devices * cfg.trainer.num_nodes


def _bytes(precision: str) -> tuple[int, int]:
    """(bytes per parameter/gradient/AdamW-state element, bytes per activation element)."""
    if precision in ("bf16-true", "16-true"):
        return 2, 2
    if precision in ("bf16-mixed", "16-mixed"):
        return 4, 2
    return (8, 8) if precision.startswith("64") else (4, 4)


def _static(cfg: ExperimentConfig, params: int, root: int, layer: int) -> dict[str, float]:
    """Parameters, gradients, optimizer state and gathered units per GPU under the strategy."""
    t, world = cfg.trainer, world_size(cfg)
    state, act = _bytes(t.precision)
    strategy = t.strategy if world > 1 else "single_device"
    shard = 1
    gathered = 0.0
    if strategy in FSDP:
        sharding = t.fsdp.sharding_strategy
        shard = {"FULL_SHARD": world, "SHARD_GRAD_OP": world, "NO_SHARD": 1,
                 "HYBRID_SHARD": world // t.num_nodes if t.num_nodes > 1 else world}[sharding]
        # ZeRO-2 keeps them gathered
        live = params if sharding == "SHARD_GRAD_OP" else root + 2 * layer
        # + one unit's unsharded gradient
        gathered = 0.0 if shard == 1 else live * act + layer * act
    elif strategy not in KNOWN_STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy!r}: not modelled by dlm plan; "
                          "allowed: " + ", ".join(KNOWN_STRATEGIES[:4]))
    out = {"parameters": params * state / shard, "gradients": params * state / shard,
           "optimizer (AdamW)": 2 * params * state / shard}
    if strategy == "ddp":
        out["gradients"] *= 2  # DDP's bucket copy of every gradient
    if gathered:
        out["gathered FSDP units"] = gathered
    if t.precision.endswith("mixed") and strategy not in FSDP:
        out["autocast weight copies"] = params * act
    return out


def _loss_bytes(cfg: ExperimentConfig, batch: int, vocab: int, act: int) -> float:
    """Logits (B, T, V) and their gradient, plus float32 log-probabilities of the scored rows
    (and gradients)."""
    pattern, seq_len = patterns.of(cfg.attention), cfg.data.max_length
    positions = pattern.input_length(seq_len)
    # E[t] = 1/2 of the tokens are masked
    scored = batch * seq_len * (1.0 if pattern.autoregressive else 0.5)
    return 2 * batch * positions * vocab * act + scored * vocab * (4 + 4 + act)


def _attention_keys(cfg: ExperimentConfig) -> float:
    """Mean number of keys a query attends to under the pattern
    (what a block-sparse kernel computes)."""
    return float(dense_mask(patterns.of(cfg.attention), cfg.data.max_length).float().sum(1).mean())


def _flops_per_token(cfg: ExperimentConfig, model, matmul_params: int) -> float:
    """6N per position for the weights + 12 * layers * heads * head_dim * keys for the scores,
    per data token."""
    c, pattern = model.config, patterns.of(cfg.attention)
    scores = 12 * c.num_hidden_layers * c.num_attention_heads * _head_dim(c) * _attention_keys(cfg)
    per_position = 6 * matmul_params + scores
    return per_position * pattern.input_length(cfg.data.max_length) / cfg.data.max_length


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def plan(cfg: ExperimentConfig, settings: PlanConfig, *, config_dir: Path,
         device: str = "cuda") -> Plan:
    """The plan of `cfg` on `settings.gpu` x `trainer.devices` x `trainer.num_nodes`."""
    folder = (Path(settings.architectures) if settings.architectures
              else config_dir / "architectures")
    kernel = resolve_backend(cfg.attention.backend, patterns.of(cfg.attention), device)
    _, act = _bytes(cfg.trainer.precision)
    arch = architecture_config(cfg, folder, vocab_size=_tiny_vocab(cfg))
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[act]
    model = meta_backbone(arch, dtype=dtype, kernel=kernel)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    root = params - layer * arch.num_hidden_layers
    batch = cfg.data.batch_size * (2 if cfg.masking.complementary else 1)
    saved = count_saved(model, cfg, batch_size=batch)
    logits = _loss_bytes(cfg, batch, arch.vocab_size, act)
    plain = saved.layers * saved.per_layer + saved.outside + saved.per_layer + logits
    ckpt = saved.layers * saved.layer_input + saved.outside + 2 * saved.per_layer + logits
    memory = _static(cfg, params, root, layer)
    state, _ = _bytes(cfg.trainer.precision)
    step_temps = 2 * params * state / max(1, world_size(cfg) if cfg.trainer.strategy in FSDP else 1)
    activations = ckpt if cfg.trainer.activation_checkpointing else plain
    memory["activations (1 micro-batch)"] = max(activations,
                                                step_temps if device == "cuda" else 0.0)
    embed = model.get_input_embeddings().weight.numel()
    matmul = params - (0 if arch.tie_word_embeddings else embed)
    flops = _flops_per_token(cfg, model, matmul)
    # recompute: one more forward
    executed = flops * (4 / 3 if cfg.trainer.activation_checkpointing else 1)
    world = world_size(cfg)
    tokens_s = settings.mfu * settings.peak_flops * world / executed
    step_tokens = (cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * world
                   * cfg.data.max_length)
    wall_s = cfg.trainer.max_steps * step_tokens / tokens_s
    return Plan(world, params, memory, plain, ckpt, flops, tokens_s, wall_s,
                settings.memory_bytes * settings.headroom)


def _tiny_vocab(cfg: ExperimentConfig) -> int | None:
    """From-scratch models take the vocabulary of their tokenizer
    (dlm.models.backbone.build_model)."""
    m = cfg.model
    if m.arch is None or (m.name_or_path is not None and Path(m.name_or_path).is_dir()):
        return None
    from dlm.models.backbone import BUILTIN_TOKENIZER, load_tokenizer

    try:
        model_cfg = dataclasses.replace(m, tokenizer=m.tokenizer or BUILTIN_TOKENIZER)
        return len(load_tokenizer(model_cfg))
    except ConfigError:
        return None


def suggestion(cfg: ExperimentConfig, settings: PlanConfig, *, config_dir: Path) -> str:
    """The first change that makes `cfg` fit, as an override:
    checkpointing, FSDP, a smaller micro-batch, more GPUs."""
    t, d = cfg.trainer, cfg.data
    tries: list[tuple[str, ExperimentConfig]] = []
    if not t.activation_checkpointing:
        tries.append(("trainer.activation_checkpointing=true",
                      _with(cfg, "trainer", activation_checkpointing=True)))
    if t.strategy not in FSDP and world_size(cfg) > 1:
        tries.append(("trainer.strategy=fsdp", _with(cfg, "trainer", strategy="fsdp")))
    base = _with(cfg, "trainer", activation_checkpointing=True)
    b = d.batch_size // 2
    while b >= 1:
        accum = t.accumulate_grad_batches * d.batch_size // b
        smaller = _with(_with(base, "data", batch_size=b), "trainer", accumulate_grad_batches=accum)
        tries.append((f"trainer.activation_checkpointing=true data.batch_size={b} "
                      f"trainer.accumulate_grad_batches={accum}", smaller))
        b //= 2
    for label, candidate in tries:
        if plan(candidate, settings, config_dir=config_dir).fits:
            return label
    return ("a larger GPU (--gpu h200), more GPUs with trainer.strategy=fsdp, "
            "or a shorter data.max_length")


def _with(cfg: ExperimentConfig, section: str, **changes) -> ExperimentConfig:
    changed = dataclasses.replace(getattr(cfg, section), **changes)
    return dataclasses.replace(cfg, **{section: changed})


def format_plan(cfg: ExperimentConfig, settings: PlanConfig, p: Plan, verdict: str) -> str:
    t = cfg.trainer
    positions = patterns.of(cfg.attention).input_length(cfg.data.max_length)
    sharding = f" {t.fsdp.sharding_strategy}" if t.strategy in FSDP else ""
    checkpointing = "on" if t.activation_checkpointing else "off"
    lines = [f"{cfg.name}: {p.params / 1e9:.3f}B parameters, {cfg.attention.pattern} "
             f"({positions} positions per sequence), micro-batch "
             f"{cfg.data.batch_size} x accumulation {t.accumulate_grad_batches} x {p.world} GPUs, "
             f"{t.precision}, strategy {t.strategy}{sharding}, "
             f"activation checkpointing {checkpointing}",
             f"per GPU ({settings.gpu}, {settings.memory_bytes / GIB:.0f} GiB, "
             f"{settings.headroom:.0%} usable):"]
    lines += [f"  {name:<30} {value / GIB:9.2f} GiB" for name, value in p.memory.items()]
    lines += [f"  {'total':<30} {p.total / GIB:9.2f} GiB of {p.capacity / GIB:.2f}",
              f"activations per micro-batch: {p.activations_plain / GIB:.2f} GiB "
              f"without checkpointing, {p.activations_checkpointed / GIB:.2f} GiB with",
              f"FLOPs per token: {p.flops_per_token / 1e9:.1f} GFLOP; at MFU {settings.mfu:.0%}: "
              f"{p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / p.world:,.0f} per GPU), "
              f"{t.max_steps} steps in {p.wall_s / 3600:.1f} h",
              verdict]
    return "\n".join(lines)


def plan_report(cfg: ExperimentConfig, settings: PlanConfig, *, config_dir: Path) -> str:
    p = plan(cfg, settings, config_dir=config_dir)
    verdict = ("fits" if p.fits
               else f"does not fit: try {suggestion(cfg, settings, config_dir=config_dir)}")
    return format_plan(cfg, settings, p, verdict)
