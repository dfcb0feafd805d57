"""`dlm bench-train`: training throughput per attention pattern, measured by short real Lightning
runs.

Each pattern trains the same config for a few steps into a scratch folder; tokens/s is Lightning's
ThroughputMonitor reading (`train/device/items_per_sec`: data tokens x_0 per second, so
block_clean's doubled input counts once) and MFU where the device's peak FLOPs are known (GPUs). The
runs track nothing (`tracking.enabled=false`): their metrics are read back from each run's CSV, so
mlflow need not be installed.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dlm.settings import ConfigError, TrainBenchConfig
from dlm.tensor import patterns
from dlm.tensor.patterns import load_experiment


@dataclass
class TrainSpeed:
    pattern: str
    tokens_per_sec: float
    mfu: float | None
    final_loss: float


def last_metrics(path: Path) -> dict[str, float]:
    """Each metric's last logged value in a Lightning CSVLogger file (one row per logging call,
    blanks elsewhere)."""
    last: dict[str, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            last.update({k: float(v) for k, v in row.items()
                         if k != "step" and v not in ("", None)})
    return last


def _required(metrics: dict[str, float], key: str, pattern: str) -> float:
    """A metric the run must have logged: missing means the run was too short to measure, not 0
    tokens/s."""
    value = metrics.get(key)
    if value is None:
        raise ConfigError(f"bench_train.steps: the {pattern} run logged no {key}; "
                          "give it more steps "
                          "(the throughput window needs at least 2 logged steps)")
    return value


def bench_training(config: str, settings: TrainBenchConfig | None = None, *,
                   overrides: Sequence[str] = ()) -> list[TrainSpeed]:
    """Train `config` for `settings.steps` under each pattern; read the throughput the run
    logged."""
    from dlm.training.trainer import train

    settings = settings or TrainBenchConfig()
    steps, rows = settings.steps, []
    with tempfile.TemporaryDirectory(prefix="dlm-bench-train-") as tmp:
        cfgs = [load_experiment(config, overrides=[
                    *overrides, f"attention.pattern={p}", f"trainer.max_steps={steps}",
                    f"output_dir={tmp}/{p}", "tracking.enabled=false",
                    f"trainer.throughput_window={max(2, steps // 2)}",
                    f"trainer.val_every_n_steps={steps}", "trainer.limit_val_batches=1",
                    f"trainer.log_every_n_steps={max(1, steps // 4)}",
                    "trainer.progress_bar=false"])
                for p in settings.patterns]
        for p, cfg in zip(settings.patterns, cfgs):
            train(cfg)
            metrics = last_metrics(Path(cfg.output_dir) / "metrics" / "metrics.csv")
            rows.append(TrainSpeed(p, _required(metrics, "train/device/items_per_sec", p),
                                   metrics.get("train/device/mfu"),
                                   _required(metrics, "train/loss", p)))
    return rows


def format_rows(rows: Sequence[TrainSpeed]) -> str:
    base = next((r.tokens_per_sec for r in rows if patterns.get(r.pattern).autoregressive), None)
    lines = ["| pattern | tokens/s | vs causal | MFU |", "|---|---:|---:|---:|"]
    for r in rows:
        rel = f"{r.tokens_per_sec / base:.2f}x" if base else "-"
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a (CPU)"
        lines.append(f"| {r.pattern} | {r.tokens_per_sec:,.0f} | {rel} | {mfu} |")
    return "\n".join(lines)
