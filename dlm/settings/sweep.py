"""The sweep file's schema (see sweeps/README.md), loading it with one-line errors, and
`dlm report`'s settings.

A sweep file names a base experiment, fixed overrides, a grid (key -> values, Cartesian product)
and/or explicit points; its `eval:` and `bench:` sections are `dlm eval`'s and `dlm bench`'s own
settings (same fields, same defaults) plus `enabled`. The sweep sets `name`, `output_dir`, `resume`
and `tracking.*` of every point, so the file may not. Expanding the grid into points and checking
each point's experiment config is `dlm.experiments.points`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

from omegaconf import MISSING

from dlm.settings.bench import BenchConfig
from dlm.settings.errors import ConfigError, check, check_choices
from dlm.settings.eval import EvalConfig
from dlm.settings.loading import load_yaml, merge

Launcher = Literal["local", "slurm"]
MANAGED_KEYS = ("name", "output_dir", "resume", "tracking")
"""Config keys the sweep sets for every point; a sweep file may not set them."""
POINT_ID = re.compile(r"^[A-Za-z0-9._+-]+$")


@dataclass
class SweepEval(EvalConfig):
    enabled: bool = True
    decode_block_sizes: List[int] = field(default_factory=list)
    """Empty: decode at the training block size, metrics `eval/<task>/<metric>`.
    Else evaluate at each size, metrics `eval/decode_block_<N>/<task>/<metric>`
    (the block-size sweep's eval axis)."""
    metric: str = "exact_match_strict-match"
    """The accuracy `dlm report` and the notebook show: `eval/<first task>/<metric>`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for n in self.decode_block_sizes:
            check(n > 0, "eval.decode_block_sizes", self.decode_block_sizes,
                  "must be positive integers")


@dataclass
class SweepBench(BenchConfig):
    enabled: bool = True


@dataclass
class SlurmSettings:
    cluster: Optional[str] = None
    """submitit cluster: null = auto (slurm where sbatch exists, else local),
    `local` (subprocesses here; the tests), `debug` (in this process)."""
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    """Also the tasks per node (one Lightning rank per GPU);
    match `trainer.devices` / `trainer.num_nodes`."""
    cpus_per_task: int = 8
    timeout_min: int = 240
    mem_gb: Optional[float] = None
    additional: Dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options (`slurm_additional_parameters`), e.g. {account: myproj, qos: high}."""


@dataclass
class SweepTracking:
    uri: Optional[str] = None
    """MLflow tracking URI; null: the base experiment's `tracking.tracking_uri`, else
    sqlite:///mlflow.db."""
    experiment: Optional[str] = None
    """MLflow experiment of the parent and child runs;
    null: the base experiment's `tracking.experiment`."""


@dataclass
class SweepConfig:
    name: str = MISSING
    """Sweep name: MLflow tag `dlm.sweep`, `dlm report NAME`, default output folder."""
    experiment: str = MISSING
    """Base experiment YAML, relative to the sweep file."""
    overrides: List[str] = field(default_factory=list)
    """`key=value` applied to every point (after the base YAML, before the point's own values)."""
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    """Config key -> values;
    the points are their Cartesian product, the last key varying fastest."""
    points: List[Dict[str, Any]] = field(default_factory=list)
    """Explicit points (key -> value, optional `id`), appended after the grid's."""
    eval: SweepEval = field(default_factory=SweepEval)
    bench: SweepBench = field(default_factory=SweepBench)
    launcher: Launcher = "local"
    """local | slurm (submitit)."""
    max_parallel: int = 1
    """Points running at once: slurm array parallelism;
    local > 1 runs points as subprocesses (submitit local)."""
    drift_every_n_steps: int = 0
    """WeightDriftCallback period; 0: drift only at the end of training."""
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    tracking: SweepTracking = field(default_factory=SweepTracking)
    output_dir: Optional[str] = None
    """Default `outputs/sweeps/<name>`; point `<id>` trains in `<output_dir>/<id>`."""


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Merge the sweep YAML (and `key=value` overrides) onto the schema;
    paths made absolute; checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep={str(path)!r}: file not found")
    sweep = merge(SweepConfig, [load_yaml(path, label="sweep")], overrides,
                  where=f"sweep {str(path)!r}: ")
    sweep.experiment = str((path.parent / sweep.experiment).resolve())
    if not Path(sweep.experiment).is_file():
        raise ConfigError(f"experiment={sweep.experiment!r}: file not found "
                          "(paths are relative to the sweep file)")
    sweep.output_dir = sweep.output_dir or f"outputs/sweeps/{sweep.name}"
    check_sweep(sweep)
    return sweep


def check_sweep(sweep: SweepConfig) -> None:
    """The sweep file's own rules
    (each point's experiment config is checked in `dlm.experiments.points`)."""
    check_choices(sweep)
    check(sweep.max_parallel >= 1, "max_parallel", sweep.max_parallel, "must be >= 1")
    check(bool(sweep.grid or sweep.points), "grid", dict(sweep.grid),
          "empty; give grid values or points")
    for key, values in sweep.grid.items():
        check(bool(values), f"grid.{key}", values, "needs at least one value")
    for i, o in enumerate(sweep.overrides):
        check("=" in o, f"overrides[{i}]", o, "must be key=value")
    keys = [*sweep.grid, *(k for p in sweep.points for k in p if k != "id"),
            *(o.split("=")[0] for o in sweep.overrides)]
    for key in keys:
        check(key.split(".")[0] not in MANAGED_KEYS, key,
              rule="set by the sweep for every point; "
                   "use the sweep's output_dir / tracking sections instead")
    check(not sweep.eval.enabled or bool(sweep.eval.tasks), "eval.tasks", sweep.eval.tasks,
          "empty; give a task or set eval.enabled=false")
    check(sweep.slurm.nodes == 1 or sweep.slurm.cluster != "local", "slurm.nodes",
          sweep.slurm.nodes, "submitit's local executor runs one node")


@dataclass
class SweepRunConfig:
    """How `dlm sweep` runs a sweep file this time
    (the file's own launcher and parallelism unless given)."""

    dry_run: bool = False
    """List and validate the points; run nothing."""
    launcher: Optional[Launcher] = None
    """Override the sweep's launcher."""
    max_parallel: Optional[int] = None
    """Points running at once (slurm array parallelism)."""
    report: bool = True
    """Print the summary table and plots at the end."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.max_parallel is None or self.max_parallel >= 1, "max_parallel",
              self.max_parallel, "must be >= 1")


@dataclass
class ReportConfig:
    threshold: float = 0.9
    """Bench threshold whose TPF and tokens/s the table shows (the nearest one measured)."""
    out_dir: Optional[str] = None
    """Where the table and PNGs go; none: <sweep output>/report."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI (default: sqlite:///mlflow.db)."""
