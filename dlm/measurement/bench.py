"""`dlm bench`: tokens/s, TPF and NFE of the cached parallel decoder against the AR baseline, in one process.

Every setting (decoder variant x batch size x threshold) decodes the same prompt set `repeats` times,
round-robin after a warm-up; tokens/s is generated tokens / wall time over the whole set (median,
min-max over repeats). With EOS on (the default) a trained model stops early, so lengths differ between settings:
the table says how many tokens each produced. `ignore_eos` forces the full length (throughput only).
Scored prompt sets (the synthetic GSM8K-format task by default) also give exact match per setting,
which is what the accuracy-vs-TPF Pareto plot (`dlm.plots`) shows.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlm.models.checkpoint import load_checkpoint, read_meta
from dlm.settings.experiment import ConfigError
from dlm.decoding.engine import DecodeConfig, GenerationOutput, ar_generate, generate
from dlm.decoding.text import encode_texts
# extract_answer, reference_answer: re-exported, they lived here before dlm.prompts
from dlm.data.prompts import SYNTHETIC, Prompt, extract_answer, load_prompts, reference_answer, score  # noqa: F401

METHODS = {"ar": "AR baseline", "dlm-1tpf": "dLM 1 token/forward", "dlm": "dLM cached", "dlm-nocache": "dLM no cache"}


@dataclass(frozen=True)
class Setting:
    method: str  # a key of METHODS
    batch_size: int
    threshold: float | None = None  # dLM cached / no-cache only

    @property
    def label(self) -> str:
        """Key part for MLflow metrics, e.g. `dlm_bs4_t0.9`."""
        return f"{self.method}_bs{self.batch_size}" + ("" if self.threshold is None else f"_t{self.threshold:g}")


@dataclass
class Target:
    """A model to decode with: the tokenizer encodes its prompts, the meta fields drive the decoder."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int
    block_size: int
    shift: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class Batch(NamedTuple):
    input_ids: Tensor  # (B, P) long, left-padded
    attention_mask: Tensor  # (B, P) 0 = pad
    answers: list[str | None]


def encode_batches(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], batch_size: int, device: torch.device) -> list[Batch]:
    """Left-padded batches; prompt ids without special tokens, as the training data tokenizes them."""
    batches = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        batches.append(Batch(*encode_texts(tokenizer, [p.text for p in chunk], device), [p.answer for p in chunk]))
    return batches


def decode_batch(target: Target, setting: Setting, batch: Batch, *, gen_length: int, eos: int | None) -> GenerationOutput:
    if setting.method == "ar":
        return ar_generate(target.model, batch.input_ids, attention_mask=batch.attention_mask,
                           max_new_tokens=gen_length, eos_token_id=eos)
    cfg = DecodeConfig(block_size=target.block_size, threshold=setting.threshold or 1.0, max_new_tokens=gen_length,
                       one_token_per_forward=setting.method == "dlm-1tpf", use_cache=setting.method != "dlm-nocache",
                       shift=target.shift)
    return generate(target.model, batch.input_ids, attention_mask=batch.attention_mask,
                    mask_token_id=target.mask_token_id, config=cfg, eos_token_id=eos)


@dataclass
class Measurement:
    seconds: list[float]  # wall time of each repeat over the whole prompt set
    generated: int  # tokens generated over the prompt set (EOS included)
    row_forwards: int  # sum over batches of nfe x rows: the forwards each prompt took part in
    calls: int  # generate calls per repeat (batches)
    nfe_total: int
    num_prompts: int
    exact_match: float | None

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


def measure(target: Target, setting: Setting, batches: Sequence[Batch], *, gen_length: int, repeats: int = 1,
            ignore_eos: bool = False, scored: bool = False) -> Measurement:
    """Decode every batch `repeats` times, timing each pass over the whole set."""
    eos = None if ignore_eos else target.tokenizer.eos_token_id
    seconds, outs = [], []
    for _ in range(repeats):
        start = _clock(target.device)
        outs = [decode_batch(target, setting, b, gen_length=gen_length, eos=eos) for b in batches]
        seconds.append(_clock(target.device) - start)
    return Measurement(
        seconds=seconds, generated=sum(sum(o.num_generated) for o in outs),
        row_forwards=sum(o.nfe * len(o.num_generated) for o in outs), calls=len(outs),
        nfe_total=sum(o.nfe for o in outs), num_prompts=sum(len(b.answers) for b in batches),
        exact_match=score(target.tokenizer, outs, batches) if scored else None,
    )


def measure_grid(grid: dict[Setting, Target], prompts: Sequence[Prompt], *, gen_length: int, repeats: int,
                 warmup: int, ignore_eos: bool, scored: bool) -> dict[Setting, Measurement]:
    """All settings warmed up first, then timed round-robin, one repeat of each at a time: a burst of load
    from elsewhere on the machine then hits every setting alike instead of skewing one comparison."""
    batches = {s: encode_batches(t.tokenizer, prompts, s.batch_size, t.device) for s, t in grid.items()}
    for s, t in grid.items():
        for _ in range(warmup):
            decode_batch(t, s, batches[s][0], gen_length=gen_length, eos=None if ignore_eos else t.tokenizer.eos_token_id)
    out: dict[Setting, Measurement] = {}
    for _ in range(repeats):
        for s, t in grid.items():
            m = measure(t, s, batches[s], gen_length=gen_length, ignore_eos=ignore_eos, scored=scored and s not in out)
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
    tokens_per_prompt: float  # generated tokens per prompt, mean (EOS stops make it < gen_length)
    exact_match: float | None
    speedup_vs_ar: float | None = None  # tokens/s over the AR baseline's at the same batch size
    speedup_cache: float | None = None  # cached over no-cache tokens/s, same threshold and batch size


def build_rows(measurements: dict[Setting, Measurement]) -> list[BenchRow]:
    rows = {s: _row(s, m) for s, m in measurements.items()}
    for s, row in rows.items():
        ar = rows.get(Setting("ar", s.batch_size))
        row.speedup_vs_ar = row.tokens_per_sec / ar.tokens_per_sec if ar else None
        no_cache = rows.get(Setting("dlm-nocache", s.batch_size, s.threshold)) if s.method == "dlm" else None
        row.speedup_cache = row.tokens_per_sec / no_cache.tokens_per_sec if no_cache else None
    return list(rows.values())


def _row(s: Setting, m: Measurement) -> BenchRow:
    tps = m.tokens_per_sec
    return BenchRow(s.method, s.batch_size, s.threshold, statistics.median(tps), min(tps), max(tps), m.tpf,
                    m.nfe_total / m.calls, m.generated / m.num_prompts, m.exact_match)


def settings(batch_sizes: Sequence[int], thresholds: Sequence[float], no_cache_thresholds: Sequence[float]) -> list[Setting]:
    """Per batch size: AR baseline, one-token-per-forward reference, cached per threshold, no-cache."""
    grid = []
    for b in batch_sizes:
        grid += [Setting("ar", b), Setting("dlm-1tpf", b)]
        grid += [Setting("dlm", b, t) for t in thresholds]
        grid += [Setting("dlm-nocache", b, t) for t in no_cache_thresholds]
    return grid


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_table(rows: Sequence[BenchRow], meta: dict[str, Any]) -> str:
    """A Markdown table (pastes into BENCHMARKS.md) and a line saying what was measured and how."""
    head = ["setting", "batch", "threshold", "tokens/s", "min–max", "TPF", "NFE", "tokens/prompt", "exact match",
            "× AR", "cache × no-cache"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [METHODS[r.method], str(r.batch_size), _fmt(r.threshold, "g"), f"{r.tokens_per_sec:.1f}",
                 f"{r.tokens_per_sec_min:.1f}–{r.tokens_per_sec_max:.1f}", f"{r.tpf:.2f}", f"{r.nfe:.1f}",
                 f"{r.tokens_per_prompt:.1f}", _fmt(r.exact_match, ".3f"), _fmt(r.speedup_vs_ar, ".2f") + ("×" if r.speedup_vs_ar else ""),
                 _fmt(r.speedup_cache, ".2f") + ("×" if r.speedup_cache else "")]
        lines.append("| " + " | ".join(cells) + " |")
    m = meta
    eos = "EOS ignored: every prompt runs the full length" if m["ignore_eos"] else "EOS stops a prompt early"
    note = (f"\ngen length {m['gen_length']} ({eos}), block {m['block_size']}, {m['device']} "
            f"({m['threads']} threads), {m['num_prompts']} prompts ({m['prompts']}), median of {m['repeats']} round-robin "
            f"repeats after {m['warmup']} warm-up; AR baseline: {m['ar_baseline']} (transformers generate + KV cache); "
            "tokens/s = generated tokens / wall time over the prompt set.")
    return "\n".join(lines) + "\n" + note


def write_json(rows: Sequence[BenchRow], meta: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    return path


def log_mlflow(rows: Sequence[BenchRow], run_id: str, tracking_uri: str, artifacts: Sequence[Path] = ()) -> None:
    """`bench/<setting>/<metric>` metrics (e.g. `bench/dlm_bs1_t0.9/tokens_per_sec`) and the files under `bench/`."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for r in rows:
        label = Setting(r.method, r.batch_size, r.threshold).label
        for key in ("tokens_per_sec", "tpf", "nfe", "exact_match", "speedup_vs_ar", "speedup_cache"):
            if getattr(r, key) is not None:
                metrics.append(Metric(f"bench/{label}/{key}", float(getattr(r, key)), now, 0))
    client = MlflowClient(tracking_uri)
    client.log_batch(run_id, metrics=metrics)
    for path in artifacts:
        client.log_artifact(run_id, str(path), "bench")


def resolve_mlflow_run(checkpoint: str | Path, run: str | None, tracking_uri: str | None) -> tuple[str, str] | None:
    """(run id, tracking URI), checked to exist. `auto`: the run that trained the checkpoint, read from the
    `mlflow_run.json` that `dlm train` writes beside `<output_dir>/final`."""
    if run is None:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dlm.training.trainer import DEFAULT_TRACKING_URI, RUN_ID_FILE

    if run == "auto":
        info = Path(checkpoint).resolve().parent / RUN_ID_FILE
        if not info.is_file():
            raise ConfigError(f"bench.mlflow_run='auto': no {info}; pass a run id")
        saved = json.loads(info.read_text())
        run, tracking_uri = saved["run_id"], tracking_uri or saved["tracking_uri"]
    uri = tracking_uri or DEFAULT_TRACKING_URI
    try:
        MlflowClient(uri).get_run(run)
    except MlflowException:
        raise ConfigError(f"bench.mlflow_run={run!r}: no such run in tracking URI {uri}") from None
    return run, uri


def check_grid(thresholds: Sequence[float], no_cache_thresholds: Sequence[float], batch_sizes: Sequence[int],
               gen_length: int, block_size: int | None, repeats: int, warmup: int, num_prompts: int) -> None:
    """One-line errors for the pure numbers, before anything is loaded."""
    for key, values in (("thresholds", thresholds), ("no_cache_thresholds", no_cache_thresholds)):
        for t in values:
            if not 0 < t <= 1:
                raise ConfigError(f"bench.{key}={t!r}: must be in (0, 1] (1.0 = one token per pass unless certain)")
    if not thresholds or not batch_sizes:
        raise ConfigError(f"bench.thresholds={list(thresholds)}, bench.batch_sizes={list(batch_sizes)}: need at least one of each")
    for key, value in (("batch_sizes", min(batch_sizes)), ("gen_length", gen_length), ("block_size", block_size),
                       ("repeats", repeats), ("num_prompts", num_prompts)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"bench.{key}={value!r}: must be a positive integer")
    if warmup < 0:
        raise ConfigError(f"bench.warmup={warmup!r}: must be >= 0")


def check_positions(name: str, target: Target, prompts: Sequence[Prompt], gen_length: int) -> None:
    limit = getattr(target.model.config, "max_position_embeddings", None)
    longest = max(len(target.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in prompts)
    if limit is not None and longest + gen_length > limit:
        raise ConfigError(f"bench.gen_length={gen_length}: longest prompt {longest} tokens + {gen_length} = "
                          f"{longest + gen_length} exceeds max_position_embeddings={limit} of {name}")


@dataclass
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any]
    table: str
    json_path: Path
    plot_path: Path | None
    mlflow_run: str | None


def _load_target(path: str | Path, block_size: int | None, device: torch.device) -> tuple[Target, str]:
    backbone, meta = load_checkpoint(path)
    model = backbone.model.to(device).eval()
    target = Target(model, backbone.tokenizer, backbone.mask_token_id, block_size or meta.block_size, meta.shift)
    return target, meta.pattern


def run_bench(checkpoint: str | Path, *, ar_baseline: str | Path | None = None,
              thresholds: Sequence[float] = (0.5, 0.7, 0.9, 1.0), batch_sizes: Sequence[int] = (1, 4),
              gen_length: int = 256, block_size: int | None = None, no_cache_thresholds: Sequence[float] = (0.9,),
              repeats: int = 3, warmup: int = 1, prompts: str | Path | None = SYNTHETIC, num_prompts: int = 16,
              scored: bool | None = None, ignore_eos: bool = False, device: str = "auto",
              mlflow_run: str | None = None, tracking_uri: str | None = None,
              output_dir: str | Path | None = None) -> BenchResult:
    """Benchmark a dlm checkpoint over the whole grid; write `bench.json` and `pareto.png` to `output_dir`
    (default `<checkpoint>/../bench`) and log to `mlflow_run` (a run id, or `auto`) when given.

    `block_size` defaults to the checkpoint's dlm.yaml. `scored=None` scores when every prompt has an
    answer. Without `ar_baseline` the AR baseline is the dLM checkpoint itself under the causal mask.
    """
    check_grid(thresholds, no_cache_thresholds, batch_sizes, gen_length, block_size, repeats, warmup, num_prompts)
    if read_meta(checkpoint).pattern == "causal":
        raise ConfigError(f"checkpoint={str(checkpoint)!r}: pattern=causal is an AR model; pass it as --ar-baseline")
    if ar_baseline is not None:
        read_meta(ar_baseline)
    run = resolve_mlflow_run(checkpoint, mlflow_run, tracking_uri)
    prompt_set = load_prompts(prompts, limit=num_prompts)
    scored = _check_scored(scored, prompt_set, prompts)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dlm_target, _ = _load_target(checkpoint, block_size, dev)
    ar_target = _load_target(ar_baseline, block_size, dev)[0] if ar_baseline is not None else dlm_target
    check_positions(str(checkpoint), dlm_target, prompt_set, gen_length)
    check_positions(str(ar_baseline or checkpoint), ar_target, prompt_set, gen_length)

    grid = {s: (ar_target if s.method == "ar" else dlm_target) for s in settings(batch_sizes, thresholds, no_cache_thresholds)}
    rows = build_rows(measure_grid(grid, prompt_set, gen_length=gen_length, repeats=repeats, warmup=warmup,
                                   ignore_eos=ignore_eos, scored=scored))
    meta = {"checkpoint": str(checkpoint), "gen_length": gen_length, "block_size": dlm_target.block_size,
            "ar_baseline": str(ar_baseline) if ar_baseline else "the dLM checkpoint under the causal mask",
            "device": dev.type, "threads": torch.get_num_threads(), "prompts": str(prompts or SYNTHETIC),
            "num_prompts": len(prompt_set), "scored": scored, "ignore_eos": ignore_eos, "repeats": repeats,
            "warmup": warmup, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return _report(rows, meta, Path(output_dir) if output_dir else Path(checkpoint).resolve().parent / "bench", run)


def _check_scored(scored: bool | None, prompts: Sequence[Prompt], source: Any) -> bool:
    answered = all(p.answer is not None for p in prompts)
    if scored and not answered:
        raise ConfigError(f"bench.prompts={str(source)!r}: scoring needs an 'answer' in every row")
    return answered if scored is None else scored


def _report(rows: list[BenchRow], meta: dict[str, Any], out: Path, run: tuple[str, str] | None) -> BenchResult:
    from dlm.measurement.plots import pareto_plot

    json_path = write_json(rows, meta, out / "bench.json")
    plot_path = pareto_plot([asdict(r) for r in rows], out / "pareto.png", meta=meta)
    if run is not None:
        log_mlflow(rows, *run, artifacts=[json_path, plot_path])
    return BenchResult(rows, meta, format_table(rows, meta), json_path, plot_path, run[0] if run else None)
