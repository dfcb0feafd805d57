"""The benchmark grid: which decoder runs at which batch size and threshold, timed how.

Every setting (decoder variant x batch size x threshold) decodes the same prompt set `repeats`
times, round-robin after a warm-up; tokens/s is generated tokens / wall time over the whole set.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlm.data.chat import ChatFormat
from dlm.data.prompts import Prompt, answers_of, score
from dlm.decoding.ar import ar_generate
from dlm.decoding.engine import generate
from dlm.decoding.output import GenerationOutput
from dlm.decoding.text import encode_texts, render_prompts
from dlm.settings import BenchConfig, DecodeConfig
from dlm.tensor.patterns import Pattern

METHODS = {"ar": "AR, lean loop (same engine)",
           "ar-hf": "AR, transformers generate",
           "dlm-1tpf": "dLM 1 token/forward",
           "dlm": "dLM cached",
           "dlm-fixed": "dLM cached, fixed",
           "dlm-nocache": "dLM no cache",
           "dlm-v2count": "dLM cached, Fast-dLLM v2 counting",
           "ar-self": "the checkpoint's AR mode (its causal path)",
           "spec": "dLM self-speculative, fused",
           "spec-sep": "dLM self-speculative, separate verify",
           "spec-br": "dLM self-speculative, branched"}
FORMS = {"spec": "fused", "spec-sep": "separate", "spec-br": "branched"}
"""The speculative methods and their `decode.speculative_form`."""
SPECULATIVE = tuple(FORMS)
MODES = {"ar": "ar", "ar-self": "ar", **{m: "speculative" for m in SPECULATIVE}}
AR_METHODS = ("ar", "ar-hf")


@dataclass(frozen=True)
class Setting:
    method: str  # a key of METHODS
    batch_size: int
    threshold: float | None = None  # threshold-policy dLM settings only
    tokens_per_pass: int | None = None  # dlm-fixed only
    # `DecodeConfig` overrides over the cached decoder, `field=value ...` (bench.decoders)
    decoder: str = ""

    @property
    def speculative(self) -> bool:
        """A self-speculative row: a speculative method, or decoder overrides with that mode."""
        overrides = dict(DecodeConfig.overrides(self.decoder)) if self.decoder else {}
        return self.method in SPECULATIVE or overrides.get("mode") == "speculative"

    @property
    def label(self) -> str:
        """Key part for MLflow metrics, e.g. `dlm_batch4_t0.9`, `dlm-fixed_batch1_n3`,
        `dlm_batch1_policy-factor_factor-1.5`."""
        shown = ("".join(f"_{k}-{v}" for k, v in DecodeConfig.overrides(self.decoder))
                 if self.decoder else "")
        threshold = "" if self.threshold is None else f"_t{self.threshold:g}"
        count = "" if self.tokens_per_pass is None else f"_n{self.tokens_per_pass}"
        return f"{self.method}_batch{self.batch_size}" + threshold + count + shown


@dataclass
class Target:
    """A model to decode with: the tokenizer encodes its prompts, the meta fields drive the
    decoder."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int
    block_size: int
    shift: bool = False
    chat: ChatFormat | None = None  # prompts rendered as a user turn of this chat template
    # the checkpoint's, whose rules the decode masks follow (None: block-causal)
    pattern: Pattern | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class Batch(NamedTuple):
    input_ids: Tensor  # (B, P) long, left-padded
    attention_mask: Tensor  # (B, P) 0 = pad
    answers: list[str | None]


def encode_batches(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], batch_size: int,
                   device: torch.device, chat: ChatFormat | None = None) -> list[Batch]:
    """Left-padded batches; prompt ids without special tokens, as the training data tokenizes
    them."""
    batches = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = render_prompts(tokenizer, [p.text for p in chunk], chat)
        batches.append(Batch(*encode_texts(tokenizer, texts, device), [p.answer for p in chunk]))
    return batches


def decode_config(target: Target, setting: Setting, *, max_new_tokens: int,
                  compile: bool = False) -> DecodeConfig:
    """The engine settings a grid setting stands for."""
    m = setting.method
    # one token per forward: fixed at 1
    fixed = setting.tokens_per_pass or (1 if m == "dlm-1tpf" else None)
    threshold = setting.threshold or (DecodeConfig.threshold if setting.decoder else 1.0)
    cfg = DecodeConfig(mode=MODES.get(m, "diffusion"), block_size=target.block_size,
                       speculative_form=FORMS.get(m, "fused"),
                       threshold=threshold,
                       max_new_tokens=max_new_tokens,
                       policy="fixed" if fixed else "threshold", tokens_per_pass=fixed or 1,
                       cache="none" if m == "dlm-nocache" else "auto",
                       early_exit=m != "dlm-v2count", compile=compile, shift=target.shift)
    return replace(cfg, **dict(DecodeConfig.overrides(setting.decoder))) if setting.decoder else cfg


def decode_batch(target: Target, setting: Setting, batch: Batch, *, max_new_tokens: int,
                 eos: int | None, compile: bool = False) -> GenerationOutput:
    if setting.method == "ar-hf":
        return ar_generate(target.model, batch.input_ids, attention_mask=batch.attention_mask,
                           max_new_tokens=max_new_tokens, eos_token_id=eos)
    cfg = decode_config(target, setting, max_new_tokens=max_new_tokens, compile=compile)
    return generate(target.model, batch.input_ids, attention_mask=batch.attention_mask,
                    mask_token_id=target.mask_token_id, config=cfg, eos_token_id=eos,
                    pattern=target.pattern)


@dataclass
class Measurement:
    seconds: list[float]  # wall time of each repeat over the whole prompt set
    generated: int  # tokens generated over the prompt set (EOS included)
    row_forwards: int  # sum over batches of nfe x rows: the forwards each prompt took part in
    calls: int  # generate calls per repeat (batches)
    nfe_total: int
    num_prompts: int
    exact_match: float | None
    v2_tokens: int = 0  # Fast-dLLM v2's count: tokens through the end of each row's EOS block ...
    v2_forwards: int = 0  # ... over its forwards plus one cache-update forward per block
    # every prompt's generated ids (the last repeat)
    tokens: list[list[int]] = field(default_factory=list)
    # the '#### N' number each prompt's text gives
    answers: list[str | None] = field(default_factory=list)

    @property
    def tokens_per_sec(self) -> list[float]:
        return [self.generated / s for s in self.seconds]

    @property
    def tpf(self) -> float:
        """Generated tokens per forward a prompt took part in (1.0 for AR at batch 1)."""
        return self.generated / max(self.row_forwards, 1)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are async: time the work, not the launches
    return time.perf_counter()


def measure(target: Target, setting: Setting, batches: Sequence[Batch], *, max_new_tokens: int,
            repeats: int = 1, ignore_eos: bool = False, scored: bool = False,
            compile: bool = False) -> Measurement:
    """Decode every batch `repeats` times, timing each pass over the whole set."""
    eos = None if ignore_eos else target.tokenizer.eos_token_id
    seconds, outs = [], []
    for _ in range(repeats):
        start = _clock(target.device)
        outs = [decode_batch(target, setting, b, max_new_tokens=max_new_tokens, eos=eos,
                             compile=compile) for b in batches]
        seconds.append(_clock(target.device) - start)
    blocks = lambda n: -(-n // target.block_size)  # noqa: E731
    return Measurement(
        seconds=seconds, generated=sum(sum(o.num_generated) for o in outs),
        row_forwards=sum(sum(o.row_forwards) for o in outs), calls=len(outs),
        nfe_total=sum(o.nfe for o in outs), num_prompts=sum(len(b.answers) for b in batches),
        exact_match=score(target.tokenizer, [t for o in outs for t in o.tokens],
                          [a for b in batches for a in b.answers])
        if scored else None,
        v2_tokens=sum(sum(o.raw_lengths) for o in outs),
        v2_forwards=sum(f + blocks(n) for o in outs for f, n in zip(o.row_forwards, o.raw_lengths)),
        tokens=[t for o in outs for t in o.tokens],
        answers=answers_of(target.tokenizer, [t for o in outs for t in o.tokens]),
    )


def measure_grid(grid: dict[Setting, Target], prompts: Sequence[Prompt], *, max_new_tokens: int,
                 repeats: int, warmup: int, ignore_eos: bool, scored: bool,
                 compile: bool = False) -> dict[Setting, Measurement]:
    """All settings warmed up first, then timed round-robin, one repeat of each at a time: a burst
    of load from elsewhere on the machine then hits every setting alike instead of skewing one
    comparison."""
    batches = {s: encode_batches(t.tokenizer, prompts, s.batch_size, t.device, t.chat)
               for s, t in grid.items()}
    for s, t in grid.items():
        for _ in range(warmup):
            decode_batch(t, s, batches[s][0], max_new_tokens=max_new_tokens,
                         eos=None if ignore_eos else t.tokenizer.eos_token_id, compile=compile)
    out: dict[Setting, Measurement] = {}
    for _ in range(repeats):
        for s, t in grid.items():
            m = measure(t, s, batches[s], max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                        scored=scored and s not in out, compile=compile)
            out[s] = replace(out[s], seconds=out[s].seconds + m.seconds) if s in out else m
    return out


@dataclass
class BenchRow:
    method: str
    batch_size: int
    threshold: float | None
    tokens_per_sec: float  # median over repeats
    tokens_per_sec_min: float
    tokens_per_sec_max: float
    tpf: float
    nfe: float  # decoding forwards per generate call (one batch), mean
    # generated tokens per prompt, mean (EOS stops make it < max_new_tokens)
    tokens_per_prompt: float
    exact_match: float | None
    tokens_per_pass: int | None = None
    decoder: str = ""  # bench.decoders rows: their `DecodeConfig` overrides
    # tokens/s over the lean AR loop's at the same batch size (the headline)
    speedup_vs_ar: float | None = None
    # tokens/s over transformers generate's at the same batch size
    speedup_vs_hf: float | None = None
    # cached over no-cache tokens/s, same policy and batch size
    speedup_cache: float | None = None
    # dlm-v2count only: TPF counted as Fast-dLLM v2 counts it
    tpf_v2: float | None = None
    # seconds per forward a prompt takes part in, over the lean AR step's
    forward_vs_ar: float | None = None
    # speculative only: share of prompts whose tokens equal the AR mode's
    same_as_ar_mode: float | None = None
    # share of prompts whose tokens equal the lean AR row's (same batch size)
    same_as_ar: float | None = None
    # share of prompts whose '#### N' answer equals the lean AR row's
    same_answer_as_ar: float | None = None


def build_rows(measurements: dict[Setting, Measurement]) -> list[BenchRow]:
    rows = {s: _row(s, m) for s, m in measurements.items()}
    for s, row in rows.items():
        own_ar = measurements.get(Setting("ar-self", s.batch_size))
        if s.speculative and own_ar:
            row.same_as_ar_mode = _share_equal(measurements[s].tokens, own_ar.tokens)
        lean = measurements.get(Setting("ar", s.batch_size))
        if lean and s.method != "ar":
            row.same_as_ar = _share_equal(measurements[s].tokens, lean.tokens)
            row.same_answer_as_ar = share_same_answer(measurements[s].answers, lean.answers)
        ar, hf = rows.get(Setting("ar", s.batch_size)), rows.get(Setting("ar-hf", s.batch_size))
        row.speedup_vs_ar = row.tokens_per_sec / ar.tokens_per_sec if ar else None
        row.speedup_vs_hf = row.tokens_per_sec / hf.tokens_per_sec if hf else None
        row.forward_vs_ar = (row.tpf * ar.tokens_per_sec / (ar.tpf * row.tokens_per_sec)
                             if ar else None)
        no_cache = (rows.get(Setting("dlm-nocache", s.batch_size, s.threshold, s.tokens_per_pass))
                    if s.method in ("dlm", "dlm-fixed") else None)
        row.speedup_cache = row.tokens_per_sec / no_cache.tokens_per_sec if no_cache else None
    return list(rows.values())


def _share_equal(ours: Sequence, theirs: Sequence) -> float | None:
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    return sum(same) / len(same) if same else None


def share_same_answer(ours: Sequence[str | None], theirs: Sequence[str | None]) -> float | None:
    """Share of problems on which both rows give the same '#### N' answer. Two outputs without an
    answer do not agree on one: a model that never answers must not score as agreeing."""
    same = [a is not None and a == b for a, b in zip(ours, theirs, strict=True)]
    return sum(same) / len(same) if same else None


def _row(s: Setting, m: Measurement) -> BenchRow:
    tps = m.tokens_per_sec
    tpf_v2 = m.v2_tokens / max(m.v2_forwards, 1) if s.method == "dlm-v2count" else None
    return BenchRow(s.method, s.batch_size, s.threshold, statistics.median(tps), min(tps),
                    max(tps), m.tpf, m.nfe_total / m.calls, m.generated / m.num_prompts,
                    m.exact_match, s.tokens_per_pass, s.decoder, tpf_v2=tpf_v2)


def settings_grid(s: BenchConfig) -> list[Setting]:
    """Per batch size: the AR baselines, the one-token reference, cached per threshold and per fixed
    count, the no-cache reference, the Fast-dLLM v2 counting rows, self-speculative decoding (both
    forms, beside the checkpoint's own AR mode, whose tokens they must equal)."""
    grid = []
    for b in s.batch_sizes:
        grid += [Setting("ar", b)] + ([Setting("ar-hf", b)] if s.hf_generate else [])
        grid += [Setting("dlm-1tpf", b)] if s.one_token_reference else []
        grid += [Setting("dlm", b, t) for t in s.thresholds]
        grid += [Setting("dlm-fixed", b, tokens_per_pass=n) for n in s.tokens_per_pass]
        grid += [Setting("dlm", b, decoder=text) for text in s.decoders]
        grid += [Setting("dlm-nocache", b, t) for t in s.no_cache_thresholds]
        grid += [Setting("dlm-nocache", b, tokens_per_pass=n) for n in s.no_cache_tokens_per_pass]
        grid += [Setting("dlm-v2count", b, t) for t in s.v2_count_thresholds]
        grid += [Setting("ar-self", b)] if s.ar_mode or s.speculative else []
        grid += [Setting(m, b) for m in SPECULATIVE] if s.speculative else []
    return grid
