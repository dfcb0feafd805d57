"""`dlm bench-train`: training throughput per attention pattern, measured by short real Lightning runs.

Each pattern trains the same config for a few steps into a scratch folder; tokens/s is Lightning's
ThroughputMonitor reading (`train/device/items_per_sec`: data tokens x_0 per second, so block_clean's
doubled input counts once) and MFU where the device's peak FLOPs are known (GPUs).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from dlm.settings import ConfigError, TrainBenchConfig, load_config
from dlm.tracking import runs

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass
class TrainSpeed:
    pattern: str
    tokens_per_sec: float
    mfu: float | None
    final_loss: float


def _last(client: MlflowClient, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return history[-1].value if history else None


def _required(client: MlflowClient, run_id: str, key: str, pattern: str) -> float:
    """A metric the run must have logged: missing means the run was too short to measure, not 0 tokens/s."""
    value = _last(client, run_id, key)
    if value is None:
        raise ConfigError(f"bench_train.steps: the {pattern} run logged no {key}; give it more steps "
                          "(the throughput window needs at least 2 logged steps)")
    return value


def bench_training(config: str, settings: TrainBenchConfig | None = None, *, overrides: Sequence[str] = ()
                   ) -> list[TrainSpeed]:
    """Train `config` for `settings.steps` under each pattern; read the throughput the run logged."""
    from dlm.training.trainer import train

    settings = settings or TrainBenchConfig()
    steps, rows = settings.steps, []
    with tempfile.TemporaryDirectory(prefix="dlm-bench-train-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cfgs = [load_config(config, overrides=[*overrides, f"attention.pattern={p}", f"trainer.max_steps={steps}",
                                               f"output_dir={tmp}/{p}", f"tracking.tracking_uri={uri}",
                                               f"trainer.throughput_window={max(2, steps // 2)}",
                                               f"trainer.val_every_n_steps={steps}", "trainer.limit_val_batches=1",
                                               f"trainer.log_every_n_steps={max(1, steps // 4)}",
                                               "trainer.progress_bar=false"]) for p in settings.patterns]
        client = runs.client(uri)
        for p, cfg in zip(settings.patterns, cfgs):
            result = train(cfg)
            rows.append(TrainSpeed(p, _required(client, result.run_id, "train/device/items_per_sec", p),
                                   _last(client, result.run_id, "train/device/mfu"),
                                   _required(client, result.run_id, "train/loss", p)))
    return rows


def format_rows(rows: Sequence[TrainSpeed]) -> str:
    base = next((r.tokens_per_sec for r in rows if r.pattern == "causal"), None)
    lines = ["| pattern | tokens/s | vs causal | MFU |", "|---|---:|---:|---:|"]
    for r in rows:
        rel = f"{r.tokens_per_sec / base:.2f}x" if base else "-"
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a (CPU)"
        lines.append(f"| {r.pattern} | {r.tokens_per_sec:,.0f} | {rel} | {mfu} |")
    return "\n".join(lines)
