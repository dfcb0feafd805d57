"""`dlm bench` arguments, kept apart from `dlm.bench` so that building the CLI parser imports no torch."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dlm.data.prompts import SYNTHETIC

if TYPE_CHECKING:
    from dlm.measurement.bench import BenchResult


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="dlm checkpoint folder (with dlm.yaml), e.g. outputs/tiny/final")
    p.add_argument("--ar-baseline", help="AR checkpoint for the baseline; default: CHECKPOINT under the causal mask")
    p.add_argument("--thresholds", type=_floats, default=[0.5, 0.7, 0.9, 1.0], help="comma list in (0, 1]")
    p.add_argument("--no-cache-thresholds", type=_floats, default=[0.9], help="comma list; no-cache is slow")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 4])
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-size", type=int, help="decode block size; default: the checkpoint's")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", default=SYNTHETIC, help=f"{SYNTHETIC} or a JSONL file of {{prompt, answer}} rows")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--no-score", dest="scored", action="store_false", default=None, help="skip exact match")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --gen-length tokens (throughput only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--mlflow-run", help="run id to log to, or 'auto' (the run that trained CHECKPOINT)")
    p.add_argument("--tracking-uri")
    p.add_argument("--output-dir", help="where bench.json and pareto.png go; default: CHECKPOINT/../bench")


def run_from_args(args: argparse.Namespace) -> BenchResult:
    import torch

    from dlm.measurement.bench import run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(args.checkpoint, ar_baseline=args.ar_baseline, thresholds=args.thresholds,
                       batch_sizes=args.batch_sizes, gen_length=args.gen_length, block_size=args.block_size,
                       no_cache_thresholds=args.no_cache_thresholds, repeats=args.repeats, warmup=args.warmup,
                       prompts=args.prompts, num_prompts=args.num_prompts, scored=args.scored,
                       ignore_eos=args.ignore_eos, device=args.device, mlflow_run=args.mlflow_run,
                       tracking_uri=args.tracking_uri, output_dir=args.output_dir)
    print(result.table)
    print(f"json: {result.json_path}\nplot: {result.plot_path}" + (f"\nmlflow run: {result.mlflow_run}" if result.mlflow_run else ""))
    return result
