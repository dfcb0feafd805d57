"""`dlm bench`: tokens/s, TPF and NFE of the cached parallel decoder against the AR baseline, in one process.

Median and min-max over round-robin repeats (`dlm.measurement.grid`). With EOS on (the default) a trained
model stops early, so lengths differ between settings: the table says how many tokens each produced.
`ignore_eos` forces the full length (throughput only). Scored prompt sets (the synthetic GSM8K-format task
by default) also give exact match per setting, which is what the accuracy-vs-TPF Pareto plot shows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dlm.data.prompts import Prompt, load_prompts
from dlm.measurement.grid import METHODS, BenchRow, Setting, Target, build_rows, measure_grid, settings_grid
from dlm.measurement.plots import pareto_plot
from dlm.models.checkpoint import load_checkpoint, read_meta
from dlm.models.device import resolve_device
from dlm.settings import BenchConfig, ConfigError, LogTarget
from dlm.tracking import runs


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
                 f"{r.tokens_per_prompt:.1f}", _fmt(r.exact_match, ".3f"),
                 _fmt(r.speedup_vs_ar, ".2f") + ("×" if r.speedup_vs_ar else ""),
                 _fmt(r.speedup_cache, ".2f") + ("×" if r.speedup_cache else "")]
        lines.append("| " + " | ".join(cells) + " |")
    m = meta
    eos = "EOS ignored: every prompt runs the full length" if m["ignore_eos"] else "EOS stops a prompt early"
    note = (f"\nmax new tokens {m['max_new_tokens']} ({eos}), block {m['block_size']}, {m['device']} "
            f"({m['threads']} threads), {m['num_prompts']} prompts ({m['prompts']}), "
            f"median of {m['repeats']} round-robin repeats after {m['warmup']} warm-up; "
            f"AR baseline: {m['ar_baseline']} (transformers generate + KV cache); "
            "tokens/s = generated tokens / wall time over the prompt set.")
    return "\n".join(lines) + "\n" + note


def write_json(rows: Sequence[BenchRow], meta: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    return path


def bench_metrics(rows: Sequence[BenchRow]) -> dict[str, float]:
    """`bench/<setting>/<metric>`, e.g. `bench/dlm_batch1_t0.9/tokens_per_sec`."""
    keys = ("tokens_per_sec", "tpf", "nfe", "exact_match", "speedup_vs_ar", "speedup_cache")
    return {f"bench/{Setting(r.method, r.batch_size, r.threshold).label}/{key}": float(getattr(r, key))
            for r in rows for key in keys if getattr(r, key) is not None}


def check_positions(name: str, target: Target, prompts: Sequence[Prompt], max_new_tokens: int) -> None:
    limit = getattr(target.model.config, "max_position_embeddings", None)
    longest = max(len(target.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"bench.max_new_tokens={max_new_tokens}: longest prompt {longest} tokens + {max_new_tokens} "
                          f"= {longest + max_new_tokens} exceeds max_position_embeddings={limit} of {name}")


@dataclass
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any]
    table: str
    json_path: Path
    plot_path: Path | None
    mlflow_run: str | None


def _load_target(path: str | Path, block_size: int | None, device: torch.device) -> Target:
    backbone, meta = load_checkpoint(path)
    model = backbone.model.to(device).eval()
    return Target(model, backbone.tokenizer, backbone.mask_token_id, block_size or meta.block_size, meta.shift)


def run_bench(checkpoint: str | Path, settings: BenchConfig | None = None, *,
              log: LogTarget | None = None) -> BenchResult:
    """Benchmark a dlm checkpoint over the whole grid; write `bench.json` and `pareto.png` to
    `settings.output_dir` (default `<checkpoint>/../bench`) and log to `log.mlflow_run` (a run id, or `auto`).

    Everything that can be checked without loading a model is checked first (ConfigError, one line).
    """
    s = settings or BenchConfig()
    if read_meta(checkpoint).pattern == "causal":
        raise ConfigError(f"checkpoint={str(checkpoint)!r}: pattern=causal is an AR model; pass it as --ar-baseline")
    if s.ar_baseline is not None:
        read_meta(s.ar_baseline)
    run = runs.resolve_run(log.mlflow_run, log.tracking_uri, checkpoint=checkpoint,
                           key="bench.mlflow_run") if log else None
    prompt_set = load_prompts(s.prompts, limit=s.num_prompts)
    scored = _check_scored(s.scored, prompt_set, s.prompts)
    device = resolve_device(s.device, key="bench.device")
    if s.threads:
        torch.set_num_threads(s.threads)
    dlm_target = _load_target(checkpoint, s.block_size, device)
    ar_target = _load_target(s.ar_baseline, s.block_size, device) if s.ar_baseline is not None else dlm_target
    check_positions(str(checkpoint), dlm_target, prompt_set, s.max_new_tokens)
    check_positions(str(s.ar_baseline or checkpoint), ar_target, prompt_set, s.max_new_tokens)
    grid = {g: (ar_target if g.method == "ar" else dlm_target)
            for g in settings_grid(s.batch_sizes, s.thresholds, s.no_cache_thresholds)}
    rows = build_rows(measure_grid(grid, prompt_set, max_new_tokens=s.max_new_tokens, repeats=s.repeats,
                                   warmup=s.warmup, ignore_eos=s.ignore_eos, scored=scored))
    meta = {"checkpoint": str(checkpoint), "max_new_tokens": s.max_new_tokens, "block_size": dlm_target.block_size,
            "ar_baseline": str(s.ar_baseline) if s.ar_baseline else "the dLM checkpoint under the causal mask",
            "device": device.type, "threads": torch.get_num_threads(), "prompts": str(s.prompts),
            "num_prompts": len(prompt_set), "scored": scored, "ignore_eos": s.ignore_eos, "repeats": s.repeats,
            "warmup": s.warmup, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(s.output_dir) if s.output_dir else Path(checkpoint).resolve().parent / "bench"
    return _report(rows, meta, out, run)


def _check_scored(scored: bool | None, prompts: Sequence[Prompt], source: Any) -> bool:
    answered = all(p.answer is not None for p in prompts)
    if scored and not answered:
        raise ConfigError(f"bench.prompts={str(source)!r}: scoring needs an 'answer' in every row")
    return answered if scored is None else scored


def _report(rows: list[BenchRow], meta: dict[str, Any], out: Path, run: tuple[str, str] | None) -> BenchResult:
    json_path = write_json(rows, meta, out / "bench.json")
    plot_path = pareto_plot([asdict(r) for r in rows], out / "pareto.png", meta=meta)
    if run is not None:
        runs.log_metrics(*run, bench_metrics(rows))
        runs.log_artifacts(*run, [json_path, plot_path], "bench")
    return BenchResult(rows, meta, format_table(rows, meta), json_path, plot_path, run[0] if run else None)
