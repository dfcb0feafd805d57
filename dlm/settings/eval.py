"""Settings of `dlm eval` (lm-eval on a checkpoint), also a sweep's `eval:` section."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from dlm.settings.decode import DecodeConfig
from dlm.settings.errors import ConfigError, check, check_choices, check_positive_int
from dlm.settings.experiment import Dtype

Likelihood = Literal["chain", "elbo"]
LIKELIHOODS = typing.get_args(Likelihood)


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=lambda: ["gsm8k_synthetic"])
    """lm-eval tasks or groups;
    gsm8k and mmlu run their offline variants when the data folder is present."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per prompt; none: the task's own."""
    limit: Optional[float] = None
    """Examples per task (a fraction if < 1); none: all."""
    batch_size: int = 1
    """Requests per decoder / scorer batch."""
    decode: Dict[str, Any] = field(default_factory=dict)
    """DecodeConfig fields over the checkpoint's defaults (training block size, shift),
    e.g. {threshold: 0.9}."""
    loglikelihood: Likelihood = "chain"
    """Multiple-choice scoring: chain (exact, one forward per request) or elbo
    (Monte Carlo, mc_num forwards)."""
    mc_num: int = 128
    """Monte-Carlo samples per request for loglikelihood=elbo (LLaDA / Dream report 128)."""
    seed: int = 0
    """Seed of the ELBO's masks
    (each request's masks also depend on its own tokens: batch-invariant)."""
    gen_kwargs: Optional[str] = None
    """lm-eval generation overrides, e.g. max_gen_toks=128."""
    apply_chat_template: Optional[bool] = None
    """Render prompts with the chat template: the one a checkpoint was trained with (dlm.yaml
    `chat_template`), else the tokenizer's own.
    None: on for checkpoints trained on chat-rendered data, off otherwise."""
    log_samples: bool = False
    """Keep every request and response in the results JSON."""
    data_dir: Optional[str] = None
    """Benchmark data folder (default: $DLM_DATA_DIR, else ../shared/data)."""
    hub_tasks: bool = False
    """Run stock gsm8k/mmlu from the hub even when local data exists."""
    output: Optional[str] = None
    """Where lm-eval's results JSON goes (default: <checkpoint>/../eval/results_<time>.json)."""
    device: Optional[str] = None
    """Device of the model; none: CUDA when present."""
    dtype: Dtype = "float32"
    """Weight dtype at load time."""

    def __post_init__(self) -> None:
        check_choices(self, "eval.")
        check(bool(self.tasks), "eval.tasks", self.tasks, "no task given; e.g. gsm8k,mmlu")
        check(self.limit is None or self.limit > 0, "eval.limit", self.limit,
              "must be > 0 (a fraction if < 1)")
        check(self.num_fewshot is None or self.num_fewshot >= 0, "eval.num_fewshot",
              self.num_fewshot, "must be >= 0")
        check_positive_int("eval.batch_size", self.batch_size)
        check_positive_int("eval.mc_num", self.mc_num)
        self.decode_overrides()  # unknown or bad decode keys fail here, before any model loads

    @property
    def limit_value(self) -> int | float | None:
        """`limit` as lm-eval takes it: a count when >= 1, else a fraction."""
        if self.limit is None:
            return None
        return int(self.limit) if self.limit >= 1 and float(self.limit).is_integer() else self.limit

    def decode_overrides(self) -> dict[str, Any]:
        """`decode`, checked against DecodeConfig's fields and values
        (`shift` comes from the checkpoint)."""
        allowed = [f for f in DecodeConfig.__dataclass_fields__ if f != "shift"]
        for key in self.decode:
            check(key in allowed, f"eval.decode.{key}", rule="unknown key", allowed=allowed)
        try:
            DecodeConfig(**self.decode)
        except ConfigError as err:
            # DecodeConfig names its keys decode.<field>; here they are eval.decode.<field>
            raise ConfigError(f"eval.{err}") from None
        except TypeError as err:  # a value of the wrong type (a string threshold)
            raise ConfigError(f"eval.decode={self.decode!r}: {err}") from None
        return dict(self.decode)
