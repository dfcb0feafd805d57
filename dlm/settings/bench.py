"""Settings of `dlm bench` (decoding speed, accuracy) and `dlm bench-train` (training throughput).

One definition of every default: the command line, the library and each sweep's `bench:` section all
start from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dlm.settings.decode import DecodeConfig
from dlm.settings.errors import check, check_block_size, check_choices, check_positive_int
from dlm.settings.experiment import PATTERNS, SYNTHETIC, Dtype


@dataclass
class BenchConfig:
    thresholds: List[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 1.0])
    """Confidence thresholds of the cached parallel decoder, each in (0, 1]."""
    batch_sizes: List[int] = field(default_factory=lambda: [1, 4])
    """Prompts decoded together; every setting runs at each."""
    max_new_tokens: int = 256
    """Tokens generated per prompt (fewer where EOS stops it first)."""
    block_size: Optional[int] = None
    """Decode block size; none: the checkpoint's training block size."""
    tokens_per_pass: List[int] = field(default_factory=list)
    """Fixed-policy settings: exactly n tokens per pass (a known TPF; times random-weight real
    shapes)."""
    decoders: List[str] = field(default_factory=list)
    """Any decoder settings, each `field=value field=value ...` of `DecodeConfig` over the cached
    threshold decoder at the checkpoint's block size, e.g. `policy=factor factor=1.5` or
    `block_size=8 sub_block_size=4 threshold=0.7` (on the command line a comma separates settings);
    each runs at every batch size beside the AR rows."""
    no_cache_thresholds: List[float] = field(default_factory=lambda: [0.9])
    """Thresholds of the (slow) no-cache reference; empty: none."""
    no_cache_tokens_per_pass: List[int] = field(default_factory=list)
    """Fixed-policy counts of the no-cache reference (cache x no-cache at a known TPF)."""
    v2_count_thresholds: List[float] = field(default_factory=list)
    """Thresholds run without early exit and counted as Fast-dLLM v2 counts (BENCHMARKS.md)."""
    one_token_reference: bool = True
    """Also time the dLM at one token per forward (the non-parallel reference)."""
    speculative: bool = False
    """Also the self-speculative rows (decode.mode=speculative, fused, separate and branched:
    drafts of block_size - 1, lossless) and the checkpoint's own AR mode, whose tokens they must
    equal (the `= AR mode` column: share of prompts token for token); needs a checkpoint trained
    with attention.clean_context=causal."""
    ar_mode: bool = False
    """Also the checkpoint's own AR mode (decode.mode=ar on the dLM: is it still a good AR model?);
    on whenever `speculative` is."""
    hf_generate: bool = True
    """Also time transformers' `generate` as a second AR row (the lean loop is the headline)."""
    compile: bool = False
    """decode.compile for every engine setting (torch.compile of the per-pass forward)."""
    dtype: Dtype = "float32"
    """Model weights' dtype for the timing (bfloat16 on a GPU)."""
    forward_costs: List[int] = field(default_factory=list)
    """Query-token counts whose single-forward cost is timed against `forward_cost_context` cached
    tokens (relative to one token: what a block pass costs vs an AR step). Empty: not measured."""
    forward_cost_context: int = 512
    """Cached tokens behind each timed forward."""
    repeats: int = 3
    """Timed round-robin passes over the prompt set; tokens/s is their median."""
    warmup: int = 1
    """Untimed batches per setting before timing."""
    prompts: str = SYNTHETIC
    """`synthetic` (the task's test split) or a JSONL file of {prompt, answer} rows."""
    num_prompts: int = 16
    """Prompts taken from the set."""
    few_shot: int = 0
    """Solved examples before each prompt, in lm-eval gsm8k's few-shot format (the first K rows of
    the `train.jsonl` beside the prompt file, or of the synthetic task's train split): the prompt
    lengths of a real few-shot evaluation, where the KV cache pays most."""
    scored: Optional[bool] = None
    """Exact match per setting; none: whenever every prompt has an answer."""
    ignore_eos: bool = False
    """Always generate max_new_tokens (throughput only)."""
    chat: Optional[bool] = None
    """Render every prompt (both models') as a user turn of the chat template: the dLM's training
    template (dlm.yaml `chat_template`), else its tokenizer's. None: on for checkpoints trained on
    chat-rendered data."""
    ar_baseline: Optional[str] = None
    """AR checkpoint for the baseline rows; none: the one the model was converted from (`base_model`
    in its dlm.yaml), else the model itself in AR mode. Where the checkpoint is itself an AR model,
    its own AR loop runs beside this one (the agreement columns compare two AR models)."""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda | cuda:N."""
    threads: Optional[int] = None
    """torch CPU threads (the tiny model is timed at 1)."""
    output_dir: Optional[str] = None
    """Where bench.json and pareto.png go; none: <checkpoint>/../bench."""

    def __post_init__(self) -> None:
        check_choices(self, "bench.")
        for key in ("thresholds", "no_cache_thresholds"):
            for t in getattr(self, key):
                check(0 < t <= 1, f"bench.{key}", t,
                      "must be in (0, 1] (1.0 = one token per pass unless certain)")
        # bench.decoders rows and the checkpoint's own AR mode count too
        any_setting = bool(self.thresholds or self.tokens_per_pass or self.decoders
                           or self.ar_mode or self.speculative)
        check(any_setting, "bench.thresholds", self.thresholds,
              "need at least one threshold (or bench.tokens_per_pass, decoders, ar_mode)")
        for text in self.decoders:
            DecodeConfig.overrides(text, key="bench.decoders")
        check(bool(self.batch_sizes), "bench.batch_sizes", self.batch_sizes,
              "need at least one batch size")
        for b in self.batch_sizes:
            check_positive_int("bench.batch_sizes", b)
        for key in ("max_new_tokens", "repeats", "num_prompts"):
            check_positive_int(f"bench.{key}", getattr(self, key))
        if self.block_size is not None:
            check_block_size(self.block_size, key="bench.block_size")
        check_positive_int("bench.threads", self.threads, optional=True)
        for key in ("tokens_per_pass", "no_cache_tokens_per_pass", "forward_costs"):
            for n in getattr(self, key):
                check_positive_int(f"bench.{key}", n)
        for t in self.v2_count_thresholds:
            check(0 < t <= 1, "bench.v2_count_thresholds", t, "must be in (0, 1]")
        check_positive_int("bench.forward_cost_context", self.forward_cost_context)
        check(self.warmup >= 0, "bench.warmup", self.warmup, "must be >= 0")
        few_shot_ok = isinstance(self.few_shot, int) and self.few_shot >= 0
        check(few_shot_ok, "bench.few_shot", self.few_shot, "must be an integer >= 0")


@dataclass
class TrainBenchConfig:
    patterns: List[str] = field(default_factory=lambda: ["causal", "block", "block_clean"])
    """Attention patterns to train, one short run each."""
    steps: int = 30
    """Optimizer steps per pattern."""

    def __post_init__(self) -> None:
        check_choices(self, "bench_train.")
        check(bool(self.patterns), "bench_train.patterns", self.patterns,
              "need at least one pattern")
        for name in self.patterns:
            check(name in PATTERNS, "bench_train.patterns", name, "unknown pattern", PATTERNS)
        check_positive_int("bench_train.steps", self.steps)

