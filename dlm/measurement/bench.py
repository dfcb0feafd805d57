"""`dlm bench`: tokens/s, TPF and NFE of the cached parallel decoder against the AR baseline, in
one process.

Median and min-max over round-robin repeats (`dlm.measurement.grid`). With EOS on (the default) a
trained model stops early, so lengths differ between settings: the table says how many tokens each
produced. `ignore_eos` forces the full length (throughput only). Scored prompt sets (the synthetic
GSM8K-format task by default) also give exact match per setting, which is what the accuracy-vs-TPF
Pareto plot shows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from dlm.data.prompts import Prompt, load_prompts
from dlm.decoding.text import chat_format_for, render_prompts
from dlm.measurement.forward_cost import forward_costs
from dlm.measurement.grid import (
    AR_METHODS,
    METHODS,
    BenchRow,
    Setting,
    Target,
    build_rows,
    measure_grid,
    settings_grid,
)
from dlm.measurement.plots import pareto_plot
from dlm.models.backbone import load_backbone
from dlm.models.checkpoint import META_FILE, CheckpointMeta, load_checkpoint, read_meta
from dlm.models.device import resolve_device
from dlm.settings import BenchConfig, ConfigError, LogTarget, check
from dlm.settings.experiment import load_config
from dlm.tracking import runs


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_table(rows: Sequence[BenchRow], meta: dict[str, Any]) -> str:
    """A Markdown table (pastes into BENCHMARKS.md) and a line saying what was measured and how."""
    head = ["setting", "batch", "policy", "tokens/s", "min–max", "TPF", "NFE", "tokens/prompt",
            "exact match", "× AR (lean)", "× HF generate", "forward / AR step", "cache × no-cache",
            "TPF (v2 count)", "= AR mode", "= AR tokens", "= AR answer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    times = lambda v: _fmt(v, ".2f") + ("×" if v else "")  # noqa: E731
    for r in rows:
        policy = (f"t {r.threshold:g}" if r.threshold is not None
                  else f"n {r.tokens_per_pass}" if r.tokens_per_pass else "–")
        method = f"{METHODS[r.method]} {r.decoder}" if r.decoder else METHODS[r.method]
        cells = [method, str(r.batch_size), policy, f"{r.tokens_per_sec:.1f}",
                 f"{r.tokens_per_sec_min:.1f}–{r.tokens_per_sec_max:.1f}", f"{r.tpf:.2f}",
                 f"{r.nfe:.1f}", f"{r.tokens_per_prompt:.1f}", _fmt(r.exact_match, ".3f"),
                 times(r.speedup_vs_ar), times(r.speedup_vs_hf), times(r.forward_vs_ar),
                 times(r.speedup_cache), _fmt(r.tpf_v2, ".2f"), _fmt(r.same_as_ar_mode, ".3f"),
                 _fmt(r.same_as_ar, ".3f"), _fmt(r.same_answer_as_ar, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    m = meta
    eos = ("EOS ignored: every prompt runs the full length" if m["ignore_eos"]
           else "EOS stops a prompt early")
    note = (f"\nmax new tokens {m['max_new_tokens']} ({eos}), block {m['block_size']}, "
            f"{m['device']} ({m['threads']} threads), "
            f"{m['num_prompts']} prompts ({m['prompts']}{_shots(m)}), "
            f"median of {m['repeats']} round-robin repeats after {m['warmup']} warm-up; "
            f"AR rows: {m['ar_baseline']}; "
            f"compile {m.get('compile', False)}, {m.get('dtype', 'float32')}; "
            "tokens/s = generated tokens / wall time over the prompt set; "
            "TPF = tokens per forward a prompt took part in.")
    return "\n".join(lines) + "\n" + note + forward_cost_table(m.get("forward_costs") or [])


def _shots(meta: dict[str, Any]) -> str:
    shots = f", {meta['few_shot']}-shot" if meta.get("few_shot") else ""
    chat = ", chat template" if meta.get("chat") else ""
    length = f", {meta['prompt_tokens']:.0f} tokens on average" if "prompt_tokens" in meta else ""
    return shots + chat + length


def forward_cost_table(costs: Sequence[dict[str, Any]]) -> str:
    """One forward of q query tokens against the cache, relative to q = 1 (an AR step)."""
    if not costs:
        return ""
    lines = ["", "", "| query tokens | ms / forward (median, min–max) | × 1 token |",
             "|---|---|---|"]
    lines += [f"| {c['query_tokens']} | {c['ms']:.2f} ({c['ms_min']:.2f}–{c['ms_max']:.2f}) "
              f"| {c['ratio']:.2f}× |" for c in costs]
    return "\n".join(lines) + f"\nagainst {costs[0]['context']} cached tokens."


def write_json(rows: Sequence[BenchRow], meta: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    return path


def bench_metrics(rows: Sequence[BenchRow]) -> dict[str, float]:
    """`bench/<setting>/<metric>`, e.g. `bench/dlm_batch1_t0.9/tokens_per_sec`."""
    keys = ("tokens_per_sec", "tpf", "nfe", "exact_match", "speedup_vs_ar", "speedup_vs_hf",
            "forward_vs_ar", "speedup_cache", "tpf_v2", "same_as_ar_mode", "same_as_ar",
            "same_answer_as_ar")
    label = lambda r: Setting(r.method, r.batch_size, r.threshold, r.tokens_per_pass,  # noqa: E731
                              r.decoder).label
    return {f"bench/{label(r)}/{key}": float(getattr(r, key)) for r in rows for key in keys
            if getattr(r, key) is not None}


def check_positions(name: str, target: Target, prompts: Sequence[Prompt],
                    max_new_tokens: int) -> float:
    """Every prompt + max_new_tokens within the model's positions; returns the mean prompt length
    in tokens."""
    limit = getattr(target.model.config, "max_position_embeddings", None)
    texts = render_prompts(target.tokenizer, [p.text for p in prompts], target.chat)
    lengths = [len(target.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    longest = max(lengths)
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"bench.max_new_tokens={max_new_tokens}: longest prompt {longest} tokens "
                          f"+ {max_new_tokens} = {longest + max_new_tokens} exceeds "
                          f"max_position_embeddings={limit} of {name}")
    return sum(lengths) / len(lengths)


@dataclass
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any]
    table: str
    json_path: Path
    plot_path: Path | None
    mlflow_run: str | None


def _load_target(path: str | Path, block_size: int | None, device: torch.device,
                 dtype: str) -> Target:
    """A dlm checkpoint or a plain HF causal LM (folder, hub id, .gguf), or an experiment YAML: its
    model built with random weights (real shapes)."""
    if Path(path).suffix in (".yaml", ".yml"):
        cfg = load_config(path)
        torch.manual_seed(cfg.seed)
        backbone = load_backbone(replace(cfg.model, dtype=dtype))
        meta = CheckpointMeta.from_config(cfg, backbone.mask_token_id)
    else:
        backbone, meta = load_checkpoint(path, dtype=dtype)
    model = backbone.model.to(device).eval()
    return Target(model, backbone.tokenizer, backbone.mask_token_id,
                  block_size or meta.block_size, meta.shift, pattern=meta.attention_pattern)


def _source_meta(checkpoint: str | Path) -> CheckpointMeta:
    if Path(checkpoint).suffix in (".yaml", ".yml"):
        cfg = load_config(checkpoint)
        return CheckpointMeta(cfg.attention.pattern, cfg.attention.block_size,
                              cfg.model.mask_token, 0, clean_context=cfg.attention.clean_context,
                              pattern_options=dict(cfg.attention.options))
    return read_meta(checkpoint)


def _ar_only(checkpoint: str | Path, settings: BenchConfig) -> tuple[str | None, str]:
    """An AR checkpoint (pattern causal) benches its own AR rows and forward costs: the baseline's
    speed and the cost table of its shape. With `--ar-baseline` naming another AR model, the
    checkpoint's own AR loop runs beside that baseline's (two fine-tunes, two steps of one run):
    the agreement columns then say how far two AR models' greedy outputs part."""
    check(not settings.speculative, "bench.speculative", settings.speculative,
          f"{str(checkpoint)!r} is an AR model (pattern causal): nothing drafts; allowed: false")
    baseline = settings.ar_baseline
    if baseline is None:
        print(f"note: {checkpoint} is an AR model (pattern causal): only its AR rows and forward "
              "costs are measured")
        return None, f"{checkpoint} (an AR model)"
    if Path(baseline).resolve() == Path(checkpoint).resolve():
        raise ConfigError(f"bench.ar_baseline={baseline!r}: the checkpoint {str(checkpoint)!r} "
                          "itself; allowed: another AR model, or unset")
    read_meta(baseline)
    print(f"note: {checkpoint} is an AR model (pattern causal): its own AR loop runs beside "
          f"the baseline {baseline}")
    return baseline, f"{baseline} (--ar-baseline)"


def ar_baseline_for(checkpoint: str | Path, settings: BenchConfig) -> tuple[str | None, str]:
    """Which model the AR rows run and how the table names it: `--ar-baseline`, else the AR
    checkpoint the model was converted from (dlm.yaml `base_model`), else the model itself in AR
    mode."""
    if settings.ar_baseline is not None:
        read_meta(settings.ar_baseline)
        return settings.ar_baseline, f"{settings.ar_baseline} (--ar-baseline)"
    meta = _source_meta(checkpoint)
    if not meta.base_model:
        return None, (f"{checkpoint} itself in AR mode "
                      f"(no source AR checkpoint recorded in its {META_FILE})")
    base = meta.base_model
    if not Path(base).exists() and (Path(base).is_absolute() or base.startswith(".")):
        raise ConfigError(f"bench.ar_baseline: the source model {base!r} recorded in "
                          f"{checkpoint}/{META_FILE} does not exist; pass --ar-baseline PATH")
    return base, f"{base} (the model it was converted from, {META_FILE} base_model)"


def run_bench(checkpoint: str | Path, settings: BenchConfig | None = None, *,
              log: LogTarget | None = None) -> BenchResult:
    """Benchmark a dlm checkpoint over the whole grid; write `bench.json` and `pareto.png` to
    `settings.output_dir` (default `<checkpoint>/../bench`) and log to `log.mlflow_run` (a run id,
    or `auto`).

    Everything that can be checked without loading a model is checked first (ConfigError, one line).
    """
    s = settings or BenchConfig()
    source = _source_meta(checkpoint)
    autoregressive = source.attention_pattern.autoregressive
    if s.speculative:
        source.check_decode_mode("speculative")
    ar_path, ar_name = (_ar_only(checkpoint, s) if autoregressive
                        else ar_baseline_for(checkpoint, s))
    run = runs.resolve_run(log.mlflow_run, log.tracking_uri, checkpoint=checkpoint,
                           key="bench.mlflow_run") if log else None
    chat = s.chat if s.chat is not None else bool(source.chat_template)
    prompt_set = load_prompts(s.prompts, limit=s.num_prompts, few_shot=s.few_shot, chat=chat)
    scored = _check_scored(s.scored, prompt_set, s.prompts)
    device = resolve_device(s.device, key="bench.device")
    if s.threads:
        torch.set_num_threads(s.threads)
    dlm_target, ar_target = _load_targets(checkpoint, ar_path, s, device)
    # both sides see the dLM's prompt form: its training template, or the tokenizer's own under
    # bench.chat
    dlm_target.chat = ar_target.chat = chat_format_for(source, dlm_target.tokenizer, chat,
                                                       key="bench.chat")
    prompt_tokens = check_positions(str(checkpoint), dlm_target, prompt_set, s.max_new_tokens)
    check_positions(str(ar_path or checkpoint), ar_target, prompt_set, s.max_new_tokens)
    grid = _grid(s, autoregressive, dlm_target, ar_target)
    rows = build_rows(measure_grid(grid, prompt_set, max_new_tokens=s.max_new_tokens,
                                   repeats=s.repeats, warmup=s.warmup, ignore_eos=s.ignore_eos,
                                   scored=scored, compile=s.compile))
    costs = forward_costs(dlm_target.model, s.forward_costs, context=s.forward_cost_context,
                          repeats=max(s.repeats, 3), compile=s.compile) if s.forward_costs else []
    meta = {"checkpoint": str(checkpoint), "max_new_tokens": s.max_new_tokens,
            "block_size": dlm_target.block_size, "ar_baseline": ar_name, "device": device.type,
            "threads": torch.get_num_threads(), "prompts": str(s.prompts),
            "num_prompts": len(prompt_set), "chat": dlm_target.chat is not None,
            "few_shot": s.few_shot, "prompt_tokens": prompt_tokens, "scored": scored,
            "ignore_eos": s.ignore_eos, "repeats": s.repeats, "warmup": s.warmup,
            "compile": s.compile, "dtype": s.dtype,
            "parameters": sum(p.numel() for p in dlm_target.model.parameters()),
            "forward_costs": costs, "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(s.output_dir) if s.output_dir else Path(checkpoint).resolve().parent / "bench"
    return _report(rows, meta, out, run)


def _grid(s: BenchConfig, autoregressive: bool, dlm_target: Target,
          ar_target: Target) -> dict[Setting, Target]:
    """Each setting and the model it decodes: AR rows the baseline, the rest the checkpoint. An AR
    checkpoint has only its own AR loop, and that only beside another baseline."""
    paired = autoregressive and ar_target is not dlm_target  # an AR model beside another
    if paired:
        s = replace(s, ar_mode=True)
    return {g: (ar_target if g.method in AR_METHODS else dlm_target) for g in settings_grid(s)
            if g.method in AR_METHODS or not autoregressive or (paired and g.method == "ar-self")}


def _load_targets(checkpoint: str | Path, ar_path: str | None, s: BenchConfig,
                  device: torch.device) -> tuple[Target, Target]:
    """The dLM and the AR-row model on `device` (the dLM itself when `ar_path` is None)."""
    dlm_target = _load_target(checkpoint, s.block_size, device, s.dtype)
    ar_target = (_load_target(ar_path, s.block_size, device, s.dtype) if ar_path is not None
                 else dlm_target)
    return dlm_target, ar_target


def _check_scored(scored: bool | None, prompts: Sequence[Prompt], source: Any) -> bool:
    answered = all(p.answer is not None for p in prompts)
    if scored and not answered:
        raise ConfigError(f"bench.prompts={str(source)!r}: scoring needs an 'answer' in every row")
    return answered if scored is None else scored


def _report(rows: list[BenchRow], meta: dict[str, Any], out: Path,
            run: tuple[str, str] | None) -> BenchResult:
    json_path = write_json(rows, meta, out / "bench.json")
    plot_path = pareto_plot([asdict(r) for r in rows], out / "pareto.png", meta=meta)
    if run is not None:
        runs.log_metrics(*run, bench_metrics(rows))
        runs.log_artifacts(*run, [json_path, plot_path], "bench")
    return BenchResult(rows, meta, format_table(rows, meta), json_path, plot_path,
                       run[0] if run else None)
