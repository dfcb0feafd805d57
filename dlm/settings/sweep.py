"""The sweep file: its schema (:class:`SweepConfig`, see sweeps/README.md), loading with one-line errors, the
grid's expansion into points with readable ids, and every point's experiment config checked before any run.

A sweep file names a base experiment, fixed overrides, a grid (key -> values, Cartesian product) and/or
explicit points. Each point is one experiment config: base YAML < `overrides` < the point's values; the sweep
itself sets `name`, `output_dir=<sweep output>/<point id>`, `resume=true` and `tracking.*`, so those keys are
refused in the file. :func:`validate_sweep` runs every point's config through `load_config` (plus the eval
tasks and a local base checkpoint), so a typo fails the whole sweep in one line, naming the point.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlm.settings.experiment import ConfigError, ExperimentConfig, TrackingConfig, load_config

LAUNCHERS = ("local", "slurm")
MANAGED_KEYS = ("name", "output_dir", "resume", "tracking")
"""Config keys the sweep sets for every point; a sweep file may not set them."""
RUNNING, DONE, FAILED = "running", "done", "failed"
"""Values of a child's `dlm.status` tag: only `done` means finished (a killed run keeps `running`)."""
POINT_ID = re.compile(r"^[A-Za-z0-9._+-]+$")


# -- schema -----------------------------------------------------------------------------------------
@dataclass
class EvalSettings:
    enabled: bool = True
    tasks: List[str] = field(default_factory=lambda: ["gsm8k_synthetic"])
    """lm-eval tasks (dlm.evaluate); `gsm8k_synthetic` reads each point's own `data.synthetic_*` split."""
    limit: Optional[float] = 100
    """Examples per task (a fraction if < 1); null: all."""
    batch_size: int = 8
    num_fewshot: Optional[int] = None
    threshold: float = 0.9
    """Decoder confidence threshold (paper: 0.9)."""
    decode_block_sizes: List[int] = field(default_factory=list)
    """Empty: decode at the training block size, metrics `eval/<task>/<metric>`. Else evaluate at each size,
    metrics `eval/decode_bs_<N>/<task>/<metric>` (the block-size sweep's eval axis)."""
    gen_kwargs: Optional[str] = None
    """lm-eval generation overrides, e.g. `max_gen_toks=32`."""
    metric: str = "exact_match_strict-match"
    """The accuracy `dlm report` and the notebook show: `eval/<first task>/<metric>`."""


@dataclass
class BenchSettings:
    enabled: bool = True
    thresholds: List[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 1.0])
    batch_sizes: List[int] = field(default_factory=lambda: [1])
    gen_length: int = 64
    repeats: int = 1
    warmup: int = 1
    num_prompts: int = 16
    no_cache_thresholds: List[float] = field(default_factory=list)
    """The slow no-cache reference; off in sweeps by default."""
    prompts: str = "synthetic"
    """`synthetic`: the test split of the point's own synthetic data; or a JSONL file of {prompt, answer}."""
    ar_baseline: Optional[str] = None
    """AR checkpoint for the tokens/s baseline; null: the dLM checkpoint under the causal mask."""


@dataclass
class SlurmSettings:
    cluster: Optional[str] = None
    """submitit cluster: null = auto (slurm where sbatch exists, else local), `local` (subprocesses here;
    the tests), `debug` (in this process)."""
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    """Also the tasks per node (one Lightning rank per GPU); match `trainer.devices` / `trainer.num_nodes`."""
    cpus_per_task: int = 8
    timeout_min: int = 240
    mem_gb: Optional[float] = None
    additional: Dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options (`slurm_additional_parameters`), e.g. {account: myproj, qos: high}."""


@dataclass
class SweepTracking:
    uri: Optional[str] = None
    """MLflow tracking URI; null: the base experiment's `tracking.tracking_uri`, else sqlite:///mlflow.db."""
    experiment: Optional[str] = None
    """MLflow experiment of the parent and child runs; null: the base experiment's `tracking.experiment`."""


@dataclass
class SweepConfig:
    name: str = MISSING
    """Sweep name: MLflow tag `dlm.sweep`, `dlm report NAME`, default output folder."""
    experiment: str = MISSING
    """Base experiment YAML, relative to the sweep file."""
    overrides: List[str] = field(default_factory=list)
    """`key=value` applied to every point (after the base YAML, before the point's own values)."""
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    """Config key -> values; the points are their Cartesian product, the last key varying fastest."""
    points: List[Dict[str, Any]] = field(default_factory=list)
    """Explicit points (key -> value, optional `id`), appended after the grid's."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    launcher: str = "local"
    """local | slurm (submitit)."""
    max_parallel: int = 1
    """Points running at once: slurm array parallelism; local > 1 runs points as subprocesses (submitit local)."""
    drift_every_n_steps: int = 0
    """WeightDriftCallback period; 0: drift only at the end of training."""
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    tracking: SweepTracking = field(default_factory=SweepTracking)
    output_dir: Optional[str] = None
    """Default `outputs/sweeps/<name>`; point `<id>` trains in `<output_dir>/<id>`."""


@dataclass(frozen=True)
class Point:
    id: str
    values: Dict[str, Any]  # swept key -> value
    index: int

    @property
    def overrides(self) -> list[str]:
        # json gives omegaconf's dotlist grammar: quoted strings stay strings ("0.1" is not 0.1)
        return [f"{k}={json.dumps(v)}" for k, v in self.values.items()]


# -- loading and expansion --------------------------------------------------------------------------
def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Merge the sweep YAML (and `key=value` overrides) onto the schema; paths made absolute; checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep={str(path)!r}: file not found")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        sweep: SweepConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"sweep {str(path)!r}: {_one_line(err)}") from None
    sweep.experiment = str((path.parent / sweep.experiment).resolve())
    if not Path(sweep.experiment).is_file():
        raise ConfigError(f"experiment={sweep.experiment!r}: file not found (paths are relative to the sweep file)")
    sweep.output_dir = sweep.output_dir or f"outputs/sweeps/{sweep.name}"
    check_sweep(sweep)
    return sweep


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "sweep"
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if "not in" in msg or "Missing key" in msg:
        allowed = _fields_at(key.rsplit(".", 1)[0] if "." in key else "")
        hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
        return f"{key}: unknown key{f' (did you mean {hint[0]!r}?)' if hint else ''}; allowed: {', '.join(allowed)}"
    if "Missing mandatory value" in msg:
        return f"{key}: required"
    return f"{key}={getattr(err, 'value', None)!r}: {msg}"


def _fields_at(dotted: str) -> list[str]:
    node: Any = SweepConfig()
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part, None)
    return list(getattr(node, "__dataclass_fields__", {}))


def check_sweep(sweep: SweepConfig) -> None:
    """The sweep file's own rules (the points' configs are checked by :func:`validate_sweep`)."""
    _require(sweep.launcher in LAUNCHERS, "launcher", sweep.launcher, f"unknown launcher; allowed: {', '.join(LAUNCHERS)}")
    _require(sweep.max_parallel >= 1, "max_parallel", sweep.max_parallel, "must be >= 1")
    _require(bool(sweep.grid or sweep.points), "grid", dict(sweep.grid), "empty; give grid values or points")
    for key, values in sweep.grid.items():
        _require(bool(values), f"grid.{key}", values, "needs at least one value")
    for i, o in enumerate(sweep.overrides):
        _require("=" in o, f"overrides[{i}]", o, "must be key=value")
    keys = [*sweep.grid, *(k for p in sweep.points for k in p if k != "id"), *(o.split("=")[0] for o in sweep.overrides)]
    for key in keys:
        _require(key.split(".")[0] not in MANAGED_KEYS, key, None,
                 f"set by the sweep for every point; use the sweep's output_dir / tracking sections instead")
    e, b = sweep.eval, sweep.bench
    _require(not e.enabled or bool(e.tasks), "eval.tasks", e.tasks, "empty; give a task or set eval.enabled=false")
    _require(0 < e.threshold <= 1, "eval.threshold", e.threshold, "must be in (0, 1]")
    for n in e.decode_block_sizes:
        _require(n > 0, "eval.decode_block_sizes", e.decode_block_sizes, "must be positive integers")
    for t in [*b.thresholds, *b.no_cache_thresholds]:
        _require(0 < t <= 1, "bench.thresholds", t, "must be in (0, 1]")
    for key in ("gen_length", "repeats", "num_prompts"):
        _require(getattr(b, key) > 0, f"bench.{key}", getattr(b, key), "must be a positive integer")
    _require(bool(b.batch_sizes) and min(b.batch_sizes) > 0, "bench.batch_sizes", b.batch_sizes, "must be positive integers")
    _require(sweep.slurm.nodes == 1 or sweep.slurm.cluster != "local", "slurm.nodes", sweep.slurm.nodes,
             "submitit's local executor runs one node")
    expand(sweep)  # point ids: readable and unique


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}" + ("" if value is None else f"={value!r}") + f": {rule}")


def expand(sweep: SweepConfig) -> list[Point]:
    """The grid's Cartesian product, then the explicit points; ids are slugs of the swept values."""
    combos = [dict(zip(sweep.grid, v)) for v in itertools.product(*sweep.grid.values())] if sweep.grid else []
    explicit = [{k: v for k, v in p.items() if k != "id"} for p in sweep.points]
    names = short_names([*sweep.grid, *(k for p in explicit for k in p)])
    ids = [None] * len(combos) + [p.get("id") for p in sweep.points]
    points, seen = [], {}
    for i, (values, given) in enumerate(zip([*combos, *explicit], ids)):
        pid = str(given) if given is not None else point_id(values, names)
        _require(bool(POINT_ID.match(pid)), f"points[{i - len(combos)}].id", pid, "letters, digits and . _ + - only")
        _require(pid not in seen, "points", pid, f"two points have this id (#{seen.get(pid)} and #{i}); give them an explicit id")
        seen[pid] = i
        points.append(Point(pid, values, i))
    return points


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Key -> its last component, or the whole key (dots as '-') where two swept keys share one."""
    keys = list(dict.fromkeys(keys))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (tail if last.count(tail) == 1 else k.replace(".", "-")) for k, tail in zip(keys, last)}


def point_id(values: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """`{attention.pattern: block_clean, objective.shift: true}` -> `pattern-block_clean_shift-true`."""
    names = names or short_names(list(values))
    return "_".join(f"{names[k]}-{_slug(v)}" for k, v in values.items()) or "base"


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(_slug(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


# -- point configs ----------------------------------------------------------------------------------
def point_config(sweep: SweepConfig, point: Point, parent_run_id: str | None = None) -> ExperimentConfig:
    """The point's full experiment config, with the sweep's name, output folder, resume and tracking."""
    try:
        cfg = load_config(sweep.experiment, overrides=[*sweep.overrides, *point.overrides])
    except ConfigError as err:
        raise ConfigError(f"sweep point {point.id!r}: {err}") from None
    from dlm.training.trainer import DEFAULT_TRACKING_URI

    tags = {"dlm.sweep": sweep.name, "dlm.point": point.id, "dlm.point_index": str(point.index), "dlm.role": "child",
            "dlm.status": RUNNING}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    cfg.name, cfg.output_dir, cfg.resume = f"{sweep.name}-{point.id}", str(Path(sweep.output_dir) / point.id), True
    cfg.tracking = TrackingConfig(tracking_uri=sweep.tracking.uri or cfg.tracking.tracking_uri or DEFAULT_TRACKING_URI,
                                  experiment=sweep.tracking.experiment or cfg.tracking.experiment,
                                  run_name=point.id, tags=tags)
    return cfg


def validate_sweep(sweep: SweepConfig) -> dict[str, ExperimentConfig]:
    """Every point's config, base checkpoint and data path, and the eval tasks, checked before anything
    runs; point id -> config."""
    from dlm.data.datamodule import check_source

    configs = {p.id: point_config(sweep, p) for p in expand(sweep)}
    for pid, cfg in configs.items():
        _check_base_checkpoint(pid, cfg.model.name_or_path)
        try:
            check_source(cfg.data)
        except ConfigError as err:
            raise ConfigError(f"sweep point {pid!r}: {err}") from None
    if sweep.eval.enabled:
        from dlm.evaluation.evaluate import prepare_tasks

        prepare_tasks(sweep.eval.tasks)  # unknown task names fail here, in one line
    return configs


def _check_base_checkpoint(pid: str, path: str | None) -> None:
    """A local base model that is missing fails now, not after the first points have trained."""
    if path is None or Path(path).expanduser().is_dir():
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path.split("/")[0]).is_dir()
    if looks_local:
        raise ConfigError(f"sweep point {pid!r}: model.name_or_path={path!r}: no such folder; train the AR model first "
                          "(for the tiny sweeps: dlm train experiments/tiny_ar.yaml)")
