"""`dlm bench-train`: training throughput per attention pattern, measured by short real Lightning runs.

Each pattern trains the same config for a few steps into a scratch folder; tokens/s is Lightning's
ThroughputMonitor reading (`train/device/items_per_sec`: data tokens x_0 per second, so block_clean's
doubled input counts once) and MFU where the device's peak FLOPs are known (GPUs).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dlm.settings.experiment import PATTERNS, ConfigError, load_config


@dataclass
class TrainSpeed:
    pattern: str
    tokens_per_sec: float
    mfu: float | None
    final_loss: float


def _last(client: "mlflow.MlflowClient", run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return history[-1].value if history else None


def bench_training(config: str, patterns: Sequence[str], *, steps: int = 30, overrides: Sequence[str] = ()) -> list[TrainSpeed]:
    """Train `config` for `steps` under each pattern; read the throughput the run logged."""
    import mlflow

    from dlm.training.trainer import train

    for p in patterns:
        if p not in PATTERNS:
            raise ConfigError(f"--patterns={p!r}: unknown pattern; allowed: {', '.join(PATTERNS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlm-bench-train-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cfgs = [load_config(config, overrides=[*overrides, f"attention.pattern={p}", f"trainer.max_steps={steps}",
                                               f"output_dir={tmp}/{p}", f"tracking.tracking_uri={uri}",
                                               f"trainer.throughput_window={max(2, steps // 2)}",
                                               f"trainer.val_every_n_steps={steps}", "trainer.limit_val_batches=1",
                                               f"trainer.log_every_n_steps={max(1, steps // 4)}",
                                               "trainer.progress_bar=false"]) for p in patterns]
        client = mlflow.MlflowClient(uri)
        for p, cfg in zip(patterns, cfgs):
            result = train(cfg)
            rows.append(TrainSpeed(p, _last(client, result.run_id, "train/device/items_per_sec") or 0.0,
                                   _last(client, result.run_id, "train/device/mfu"),
                                   _last(client, result.run_id, "train/loss") or float("nan")))
    return rows


def format_rows(rows: Sequence[TrainSpeed]) -> str:
    base = next((r.tokens_per_sec for r in rows if r.pattern == "causal"), None)
    lines = ["| pattern | tokens/s | vs causal | MFU |", "|---|---:|---:|---:|"]
    for r in rows:
        rel = f"{r.tokens_per_sec / base:.2f}x" if base else "-"
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a (CPU)"
        lines.append(f"| {r.pattern} | {r.tokens_per_sec:,.0f} | {rel} | {mfu} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. experiments/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every pattern")
    parser.add_argument("--patterns", default="causal,block,block_clean")
    parser.add_argument("--steps", type=int, default=30)


def run_from_args(args: argparse.Namespace) -> None:
    rows = bench_training(args.config, args.patterns.split(","), steps=args.steps, overrides=args.overrides)
    print(format_rows(rows))
