"""The experiment config: a dataclass per section, merged with YAML files and `key=value` overrides.

omegaconf merges `experiments/*.yaml` and command-line overrides onto the schema, so a wrong key,
type or choice fails with the key's name before any compute starts;
cross-field rules live in :func:`validate`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

from dlm.settings.errors import (
    ConfigError,
    check,
    check_block_size,
    check_choices,
    check_positive_int,
)
from dlm.settings.loading import flatten, merge, to_yaml, yaml_layers
from dlm.settings.lora import LoraConfig, check_lora
from dlm.settings.scaling import FSDPConfig
from dlm.settings.tracking import TrackingConfig

__all__ = ["ConfigError", "ExperimentConfig", "flatten", "load_config", "save_config", "to_yaml",
           "validate"]
"""ConfigError, flatten and to_yaml are re-exported: the experiment config's API in one import."""

CleanContext = Literal["block", "causal"]
Backend = Literal["auto", "sdpa", "flex", "flash", "eager"]
MaskingStrategy = Literal["uniform", "position"]
Weighting = Literal["elbo", "none"]
Dtype = Literal["float32", "bfloat16", "float16", "float64"]
Precision = Literal["32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true"]
_PATTERNS_DIR = Path(__file__).parents[1] / "tensor" / "patterns"
PATTERNS = tuple(sorted(p.stem for p in _PATTERNS_DIR.glob("[!_]*.py") if p.stem != "base"))
"""The registered attention patterns: the modules of `dlm/tensor/patterns/`, listed here without
importing them (settings stay torch-free);
the registry there checks that each module defines the pattern of its name."""
CLEAN_CONTEXTS = typing.get_args(CleanContext)
BACKENDS = typing.get_args(Backend)
DTYPES = typing.get_args(Dtype)
STRATEGIES = typing.get_args(MaskingStrategy)
WEIGHTINGS = typing.get_args(Weighting)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
"""Lightning's accelerator names (its registry may hold more; `dlm.training.preflight` asks it)."""
SYNTHETIC = "synthetic"
"""`data.path` / `bench.prompts` value naming the generated offline task."""


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    """HF hub id or local folder of a causal LM (or a dlm checkpoint).
    None: build from `arch` + `config`."""
    arch: Optional[str] = None
    """HF `model_type` to build from scratch (e.g. qwen3, llama) when `name_or_path` is None."""
    config: Dict[str, Any] = field(default_factory=dict)
    """HF config kwargs for a from-scratch model (hidden_size, num_hidden_layers, ...)."""
    tokenizer: Optional[str] = None
    """Tokenizer folder or hub id; default: `name_or_path`."""
    mask_token: str = "<|mask|>"
    """[MASK] token; added to the vocabulary (embeddings resized) when the tokenizer lacks it."""
    trust_remote_code: bool = False
    """Run a checkpoint's own modeling code. Off by default: it is arbitrary code execution."""
    dtype: Dtype = "float32"
    """Weight dtype at load time; mixed precision is `trainer.precision`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA conversion through peft (off: full training)."""


@dataclass
class AttentionConfig:
    pattern: str = "block_clean"
    """A registered pattern (`PATTERNS`: causal | bidirectional | block | block_clean | ...;
    docs/design.md §1; paper winner: block_clean). Each is one module of `dlm/tensor/patterns/`."""
    block_size: int = 16
    """Diffusion block length L' in tokens (paper: 16 for 1.5B, 64 for 4B/8B)."""
    backend: Backend = "auto"
    """auto (CPU: sdpa, CUDA: flex) | sdpa | flex | flash | eager."""
    clean_context: CleanContext = "block"
    """block_clean's clean half x_0: block (BD3-LM, block-causal) |
    causal (token-causal, so the clean KV cache is a causal LM's: joint AR + diffusion training with
    `objective.ar_weight`, speculative decoding)."""
    options: Dict[str, Any] = field(default_factory=dict)
    """The pattern's own options (its dataclass fields beyond block_size),
    e.g. `{window: 2}` for `block_window`."""
    block_size_schedule: List[List[int]] = field(default_factory=list)
    """Training block-size stages [[step, block_size], ...] from step 0
    (LLaDA 2.0 warm-up, SDAR / TDAR progressive blocks), e.g. [[0, 2], [400, 4], [800, 8]];
    replaces `block_size` in training, and the checkpoint records the last stage's size.
    [] = `block_size` throughout."""

    def block_size_at(self, step: int) -> int:
        """The training block size in force at optimizer step `step`."""
        size = self.block_size
        for start, stage_size in self.block_size_schedule:
            if step >= start:
                size = stage_size
        return size

    def padding_block_size(self) -> int:
        """`data.pad_to_block` pads to a multiple of every stage's size,
        so no stage's block spans documents."""
        if not self.block_size_schedule:
            return self.block_size
        return math.lcm(*(size for _, size in self.block_size_schedule))


@dataclass
class MaskingConfig:
    strategy: MaskingStrategy = "position"
    """uniform | position (the paper's position-dependent masking)."""
    half_life: float = 0.1
    """Half-life ratio lambda = ln2 / (beta * L'); paper: 0.1;
    large -> uniform, ->0 masks the rightmost k."""
    complementary: bool = False
    """Add a second copy with the complementary mask (Fast-dLLM v2),
    so every token is supervised once."""
    eps: float = 1e-3
    """t ~ U[eps, 1] per block."""
    t_min: float = 0.0
    """Lower end of the per-block rate, t ~ U[max(eps, t_min), 1]. A self-speculative draft is a
    block of [MASK]s only, which t ~ U[0, 1] trains on one block in 2 * block_size; a high t_min
    (0.75 at block 4: half the blocks all masked) trains the drafter on what it decodes."""


@dataclass
class ObjectiveConfig:
    weighting: Weighting = "elbo"
    """elbo (1/t, or L'/k for exact-k masking) | none."""
    shift: bool = False
    """Dream-style: the logit at i-1 predicts token i. The paper finds no shift better."""
    ar_weight: float = 0.0
    """Weight of the next-token AR loss on block_clean's clean half (its causal logits predict x_0
    shifted by one), added in the same forward; needs `attention.clean_context: causal`.
    0 = diffusion only. NLD: 1.0."""
    diffusion_weight: float = 1.0
    """Weight of the diffusion loss (NLD's joint objective: 0.3 with ar_weight 1.0)."""
    certainty_weight: float = 0.0
    """Weight of certainty forcing (dParallel): the mean entropy of softmax(logits / T) over the
    masked tokens predicted right, added to the diffusion loss so correct predictions turn
    confident sooner (more tokens per threshold pass). 0 = off."""
    certainty_temperature: float = 1.0
    """T of the certainty term's softmax."""


@dataclass
class DataConfig:
    path: str = SYNTHETIC
    """HF dataset id, a local file/folder (json, jsonl, parquet, txt), or `synthetic`
    (generated offline)."""
    name: Optional[str] = None
    """HF dataset config name."""
    text_field: str = "text"
    prompt_field: Optional[str] = None
    """With `response_field`: SFT-style rows; only response tokens are noised and scored."""
    response_field: Optional[str] = None
    messages_field: Optional[str] = None
    """A column of conversations, `[{role, content}, ...]`, rendered through the tokenizer's chat
    template; only assistant turns (and their end token) are noised and scored.
    Implies `chat_template`."""
    chat_template: bool = False
    """Render prompt/response rows as a user and an assistant turn through the tokenizer's chat
    template (the form an instruct model was tuned on);
    the template is recorded in the checkpoint's dlm.yaml."""
    system_prompt: Optional[str] = None
    """With a chat template: the system turn (None: the template's default, e.g. SmolLM2's own)."""
    train_split: str = "train"
    val_split: Optional[str] = None
    """None: hold out `val_fraction` of the train split."""
    val_fraction: float = 0.05
    max_length: int = 512
    """Packed sequence length L in tokens."""
    pad_to_block: bool = False
    """Pad each document to a block multiple so no block spans two documents (Fast-dLLM v2)."""
    document_mask: bool = False
    """Packed rows carry document ids and every pattern also requires same-document to attend
    (LLaDA 2.0's document-level mask; SDAR's "neat packing")."""
    restart_positions: bool = True
    """With `document_mask`: position ids restart at 0 at each document of a packed row."""
    batch_size: int = 8
    num_workers: int = 0
    synthetic_size: int = 20000
    """Rows of the generated offline task when `path` is `synthetic`."""
    synthetic_max_number: int = 20
    """Largest operand of the generated word problems."""
    cache_dir: str = "outputs/data"
    """Where generated data (the synthetic task) is written."""
    streaming: bool = False
    """Read the data as a stream (`load_dataset(streaming=True)`): nothing is downloaded or
    tokenized whole, for corpora such as FineWeb-Edu. The train loader's position is saved in
    checkpoints, so resume goes on where the stream stopped."""
    val_rows: int = 1000
    """With `streaming` and no `val_split`:
    rows held out from the head of the train split for validation."""
    shuffle_buffer: int = 10000
    """With `streaming`: rows in the shuffle buffer (a stream is shuffled approximately)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5, cosine)."""
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of `lr`."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 disables."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    """Lightning strategy: auto | ddp | fsdp (FSDP1, GPU) |
    fsdp2 (FSDP2 per decoder layer, also CPU) | ..."""
    precision: Precision = "32-true"
    accumulate_grad_batches: int = 1
    val_every_n_steps: int = 200
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200
    export_every_n_steps: int = 0
    """Also export an HF dlm folder `<output_dir>/steps/step-NNNNNN` every N steps, for
    `dlm average` along the run (LAWA) or `dlm bench`; 0 = only `<output_dir>/final`."""
    progress_bar: bool = True
    throughput_window: int = 20
    """Steps averaged for train/items_per_sec (tokens/s) and train/device/mfu."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them
    (`dlm plan` shows the saving); under FSDP through Lightning's policy,
    otherwise transformers' gradient checkpointing."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """With `strategy: fsdp`: sharding per decoder layer, mixed precision, offload
    (dlm/settings/scaling.py)."""


@dataclass
class ExperimentConfig:
    name: str = "dlm"
    seed: int = 0
    output_dir: str = "outputs/${name}"
    """Lightning checkpoints go to `<output_dir>/checkpoints`,
    the HF export to `<output_dir>/final`."""
    resume: bool = False
    """Continue from `<output_dir>/checkpoints/last.ckpt` in the same MLflow run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_config(*paths: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Merge YAML files (in order, each after the parents it names with `base:`) and `key=value`
    overrides onto the schema, then validate."""
    layers = [layer for p in paths for layer in yaml_layers(Path(p))]
    return validate(merge(ExperimentConfig, layers, overrides))


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Choices, ranges and cross-field rules; raise ConfigError naming the first bad key."""
    check_choices(cfg)
    a, m, d = cfg.attention, cfg.masking, cfg.data
    check_positive_int("data.max_length", d.max_length)
    check_block_size(a.block_size, d.max_length)
    check(a.pattern in PATTERNS, "attention.pattern", a.pattern, "unknown pattern", PATTERNS)
    check_schedule(a, d.max_length)
    check(m.half_life > 0, "masking.half_life", m.half_life, "must be > 0 (large = uniform)")
    check(0 < m.eps < 1, "masking.eps", m.eps, "must be in (0, 1)")
    check(0 <= m.t_min < 1, "masking.t_min", m.t_min, "must be in [0, 1)")
    has_model = cfg.model.name_or_path is not None or cfg.model.arch is not None
    check(has_model, "model.name_or_path", None,
          "set a checkpoint, or model.arch (+ model.config) to build one from scratch")
    check_lora(cfg.model.lora, name_or_path=cfg.model.name_or_path,
               strategy=str(cfg.trainer.strategy))
    check(d.messages_field is None or not (d.prompt_field or d.response_field),
          "data.messages_field", d.messages_field,
          "conversations carry their own turns; unset data.prompt_field/response_field")
    check(d.system_prompt is None or d.chat_template or d.messages_field is not None,
          "data.system_prompt", d.system_prompt,
          "only a chat template renders a system turn; set data.chat_template=true")
    check(d.batch_size > 0, "data.batch_size", d.batch_size, "must be a positive integer")
    check(not (d.document_mask and a.backend == "flash"), "attention.backend", a.backend,
          "flash takes no mask, so it cannot apply data.document_mask; "
          "allowed: auto, sdpa, flex, eager")
    check(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
    check(d.val_rows > 0, "data.val_rows", d.val_rows, "must be a positive integer")
    check(d.shuffle_buffer > 0, "data.shuffle_buffer", d.shuffle_buffer,
          "must be a positive integer")
    check(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be > 0")
    check(cfg.trainer.max_steps > 0, "trainer.max_steps", cfg.trainer.max_steps,
          "must be a positive integer")
    check(len(cfg.optim.betas) == 2, "optim.betas", cfg.optim.betas,
          "must be two numbers, e.g. [0.9, 0.95]")
    _validate_optim(cfg.optim)
    _validate_objective(cfg)
    _validate_run_knobs(cfg)
    return cfg


def _validate_objective(cfg: ExperimentConfig) -> None:
    """The joint AR + diffusion weights' ranges
    (which patterns take the AR term: `Pattern.check`)."""
    o = cfg.objective
    check(o.ar_weight >= 0, "objective.ar_weight", o.ar_weight, "must be >= 0 (0 = diffusion only)")
    check(o.diffusion_weight >= 0, "objective.diffusion_weight", o.diffusion_weight, "must be >= 0")
    check(o.certainty_weight >= 0, "objective.certainty_weight", o.certainty_weight,
          "must be >= 0 (0 = off)")
    check(o.certainty_temperature > 0, "objective.certainty_temperature",
          o.certainty_temperature, "must be > 0")


def _validate_optim(o: OptimConfig) -> None:
    check(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "each must be in [0, 1)")
    check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")


def _validate_run_knobs(cfg: ExperimentConfig) -> None:
    """The Lightning Trainer's integer knobs and the loader's, checked here rather than failing
    mid-run (a zero `val_every_n_steps` divides by zero after the first validation). Whether an
    accelerator or strategy exists on this machine is Lightning's to say: `dlm.training.preflight`
    asks it before the run starts."""
    t, d = cfg.trainer, cfg.data
    for key in ("num_nodes", "accumulate_grad_batches", "val_every_n_steps", "log_every_n_steps",
                "checkpoint_every_n_steps", "throughput_window"):
        check_positive_int(f"trainer.{key}", getattr(t, key))
    check(isinstance(t.export_every_n_steps, int) and t.export_every_n_steps >= 0,
          "trainer.export_every_n_steps", t.export_every_n_steps,
          "must be an integer >= 0 (0 exports only the final folder)")
    check(isinstance(t.limit_val_batches, int) and t.limit_val_batches >= 0,
          "trainer.limit_val_batches", t.limit_val_batches,
          "must be an integer >= 0 (0 skips validation)")
    check_devices(t.devices)
    check(isinstance(t.accelerator, str) and t.accelerator != "", "trainer.accelerator",
          t.accelerator, "must name an accelerator", ACCELERATORS)
    check(isinstance(t.strategy, str) and t.strategy != "", "trainer.strategy", t.strategy,
          "must name a strategy")
    check(isinstance(d.num_workers, int) and d.num_workers >= 0, "data.num_workers", d.num_workers,
          "must be an integer >= 0 (0 loads in the main process)")
    check(d.synthetic_size >= 2 or d.path != SYNTHETIC, "data.synthetic_size", d.synthetic_size,
          "must be >= 2 (train and validation rows)")
    check(d.synthetic_max_number >= 2, "data.synthetic_max_number", d.synthetic_max_number,
          "must be >= 2")
    check(0 <= cfg.seed < 2**32, "seed", cfg.seed, "must be in [0, 2**32)")


def check_devices(devices: Any) -> None:
    """Lightning's `devices`: auto, a count >= 1, -1 (all), a list of indices,
    or a string of them ("0,1")."""
    ok = devices == "auto" or devices == -1
    if isinstance(devices, int) and not isinstance(devices, bool):
        ok = ok or devices > 0
    elif isinstance(devices, (list, tuple)):
        ok = bool(devices) and all(isinstance(i, int) and i >= 0 for i in devices)
    elif isinstance(devices, str) and devices != "auto":
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        all_digits = bool(parts) and all(p.isdigit() for p in parts)
        digits_ok = all_digits and (len(parts) > 1 or int(parts[0]) > 0 or devices.endswith(","))
        ok = devices.strip() == "-1" or digits_ok
    check(ok, "trainer.devices", devices,
          "must be auto, a count >= 1, -1 (all) or a list of device indices",
          "auto, 1, 2, -1, [0, 1], '0,1'")


def check_schedule(a: AttentionConfig, max_length: int) -> None:
    """Stages are [step, block_size] pairs from step 0, steps increasing,
    each size dividing the length."""
    schedule = [list(stage) for stage in a.block_size_schedule]
    if not schedule:
        return
    key = "attention.block_size_schedule"
    check(all(len(stage) == 2 for stage in schedule), key, schedule,
          "each stage is [step, block_size]", "e.g. [[0, 2], [400, 4], [800, 8]]")
    steps = [step for step, _ in schedule]
    check(steps[0] == 0 and all(x < y for x, y in zip(steps, steps[1:])), key, schedule,
          "stage steps must start at 0 and increase", "e.g. [[0, 2], [400, 4], [800, 8]]")
    for i, (_, size) in enumerate(schedule):
        check_block_size(size, max_length, key=f"{key}[{i}]")


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
