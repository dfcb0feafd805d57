"""`dlm sweep`: a grid of experiment configs, each point trained, benchmarked and evaluated in its own
nested MLflow run under one parent run, resumable after a crash.

A sweep file (`sweeps/*.yaml`, schema :class:`SweepConfig`, see sweeps/README.md) names a base experiment,
fixed overrides, a grid (key -> values, Cartesian product) and/or explicit points. Each point is one
experiment config: base YAML < `overrides` < the point's values; the sweep itself sets `name`,
`output_dir=<sweep output>/<point id>`, `resume=true` and `tracking.*`, so those keys are refused in the file.

Order of work. Every point's config goes through `load_config` first (plus the eval tasks and a local base
checkpoint), so a typo fails the whole sweep in one line, naming the point, before any run exists. Then one
parent run (tags `dlm.sweep=<name>`, `dlm.role=parent`; found again by those tags on a re-run) and per
pending point: train (with `WeightDriftCallback`) -> bench -> eval, all into the point's child run (tags
`mlflow.parentRunId`, `dlm.sweep`, `dlm.point`), which ends with the tag `dlm.status=done`.

Resuming. A re-run skips points whose child has `dlm.status=done`. A point killed mid-training continues
from `<point dir>/checkpoints/last.ckpt` in its same child run (`dlm train`'s `resume=true` reads the run id
from `<point dir>/mlflow_run.json`); a point whose `final/` export exists is not trained again, only
benchmarked and evaluated. A failed point does not stop the others; the sweep reports it and exits non-zero.

Launchers. `local`: points run one after another in this process (with `max_parallel` > 1: as subprocesses
through submitit's local executor, `max_parallel` at a time). `slurm`: one submitit job per point
(`submitit.AutoExecutor`, `slurm_array_parallelism=max_parallel`) calling :func:`run_point`; with
`slurm.cluster: local` submitit's local executor runs each job as a subprocess on this machine (how the
tests run it). That executor starts every job it is given at once, so it is handed `max_parallel` jobs at
a time. Multi-GPU / multi-node training inside a point is Lightning's (`trainer.strategy=ddp|fsdp`,
`trainer.devices`, `trainer.num_nodes`) under the slurm launcher, with one task per GPU; only rank 0
benchmarks, evaluates and writes tags.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlm.config import ConfigError, ExperimentConfig, TrackingConfig, load_config

if TYPE_CHECKING:
    import lightning as L
    import submitit
    from mlflow import MlflowClient
    from mlflow.entities import Run

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
    from dlm.train import DEFAULT_TRACKING_URI

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
    from dlm.data import check_source

    configs = {p.id: point_config(sweep, p) for p in expand(sweep)}
    for pid, cfg in configs.items():
        _check_base_checkpoint(pid, cfg.model.name_or_path)
        try:
            check_source(cfg.data)
        except ConfigError as err:
            raise ConfigError(f"sweep point {pid!r}: {err}") from None
    if sweep.eval.enabled:
        from dlm.evaluate import prepare_tasks

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


def tracking_target(configs: dict[str, ExperimentConfig]) -> tuple[str, str]:
    """(tracking URI, MLflow experiment) shared by the parent and every child."""
    first = next(iter(configs.values()))
    return first.tracking.tracking_uri, first.tracking.experiment


# -- MLflow: parent and child runs ------------------------------------------------------------------
def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created if new; a sqlite store keeps artifacts in `mlruns/` beside its file
    (not in the working directory, MLflow's default)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


def find_parent(client: MlflowClient, sweep_name: str, experiment_ids: Sequence[str] | None = None) -> Run | None:
    """The newest parent run of `sweep_name` (tags dlm.sweep + dlm.role=parent), or None."""
    ids = list(experiment_ids) if experiment_ids else [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, f"tags.`dlm.sweep` = '{sweep_name}' and tags.`dlm.role` = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def ensure_parent(sweep: SweepConfig, points: Sequence[Point], uri: str, experiment: str) -> str:
    """The sweep's parent run (reused on a re-run, set RUNNING again); its tags tell `dlm report` what was swept."""
    client = _client(uri)
    exp_id = experiment_id(client, experiment, uri)
    found = find_parent(client, sweep.name, [exp_id])
    swept = list(short_names([k for p in points for k in p.values]))
    tags = {"dlm.sweep": sweep.name, "dlm.role": "parent", "dlm.swept": json.dumps(swept),
            "dlm.points": json.dumps([p.id for p in points]), "dlm.output_dir": str(Path(sweep.output_dir).resolve()),
            "dlm.eval.tasks": ",".join(sweep.eval.tasks), "dlm.eval.metric": sweep.eval.metric}
    if found is None:
        run_id = client.create_run(exp_id, run_name=sweep.name, tags=tags).info.run_id
    else:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
    out = Path(sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(sweep)))
    client.log_artifact(run_id, str(out / "sweep.yaml"))
    return run_id


def finished_points(uri: str, parent_run_id: str) -> dict[str, str]:
    """Point id -> run id of the children marked `dlm.status=done`."""
    client = _client(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`dlm.status` = '{DONE}'")
    return {r.data.tags["dlm.point"]: r.info.run_id for r in runs}


def _store_exists(uri: str) -> bool:
    """False for a sqlite file not yet created: a dry run must not create the store."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


# -- one point --------------------------------------------------------------------------------------
@dataclass
class PointOutcome:
    point_id: str
    status: str  # done | skipped | failed
    run_id: str | None = None
    error: str | None = None


def run_point(sweep: SweepConfig | str | Path, point_id: str, parent_run_id: str | None = None,
              cwd: str | None = None, *, callbacks: Sequence[L.Callback] = ()) -> PointOutcome:
    """Train -> bench -> eval one point into its child run, then tag it done. Top-level and picklable: the
    slurm launcher's job function. Skips a point already done; resumes a half-trained one."""
    if cwd:
        os.chdir(cwd)  # relative paths in the sweep (outputs/, sqlite:///mlflow.db) mean the launcher's cwd
    sweep = sweep if isinstance(sweep, SweepConfig) else load_sweep(sweep)
    point = next((p for p in expand(sweep) if p.id == point_id), None)
    if point is None:
        raise ConfigError(f"point={point_id!r}: not in sweep {sweep.name!r}")
    cfg = point_config(sweep, point)
    uri, experiment = cfg.tracking.tracking_uri, cfg.tracking.experiment
    parent_run_id = parent_run_id or ensure_parent(sweep, expand(sweep), uri, experiment)
    cfg.tracking.tags["mlflow.parentRunId"] = parent_run_id
    done = finished_points(uri, parent_run_id)
    if point.id in done:
        return PointOutcome(point.id, "skipped", done[point.id])
    run_id = _recorded_run(cfg)
    if run_id and _rank() == 0:  # resuming a killed or failed point
        _client(uri).set_tag(run_id, "dlm.status", RUNNING)
    try:
        run_id = _train(cfg, sweep, callbacks)
        if _rank() == 0:
            _bench_and_eval(sweep, cfg, run_id)
            client = _client(uri)
            client.set_tag(run_id, "dlm.status", DONE)
            client.set_terminated(run_id, "FINISHED")
        return PointOutcome(point.id, DONE, run_id)
    except Exception as err:
        run_id = run_id or _recorded_run(cfg)
        if run_id and _rank() == 0:
            _client(uri).set_tag(run_id, "dlm.status", FAILED)
            _client(uri).set_tag(run_id, "dlm.error", f"{type(err).__name__}: {err}"[:5000])
            _client(uri).set_terminated(run_id, "FAILED")
        raise


def _train(cfg: ExperimentConfig, sweep: SweepConfig, callbacks: Sequence[L.Callback]) -> str:
    """Train unless `final/` (written only at the end of training) exists; the child run's id."""
    if (Path(cfg.output_dir) / "final" / "dlm.yaml").is_file() and _recorded_run(cfg):
        return _recorded_run(cfg)
    from dlm.callbacks import WeightDriftCallback
    from dlm.train import train

    result = train(cfg, callbacks=[WeightDriftCallback(sweep.drift_every_n_steps), *callbacks])
    return result.run_id


def _recorded_run(cfg: ExperimentConfig) -> str | None:
    from dlm.train import RUN_ID_FILE

    path = Path(cfg.output_dir) / RUN_ID_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def _rank() -> int:
    """Global rank under Lightning/SLURM multi-process training (0 in a single process)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def _bench_and_eval(sweep: SweepConfig, cfg: ExperimentConfig, run_id: str) -> None:
    final = Path(cfg.output_dir) / "final"
    if sweep.bench.enabled:
        bench_point(final, sweep.bench, cfg, run_id)
    if sweep.eval.enabled:
        for block_size in sweep.eval.decode_block_sizes or [None]:
            eval_point(final, sweep.eval, cfg, run_id, block_size)


def bench_point(checkpoint: Path, settings: BenchSettings, cfg: ExperimentConfig, run_id: str) -> None:
    """`dlm.bench.run_bench` on the point's export, logging `bench/<setting>/<metric>` into its run."""
    from dlm.bench import run_bench

    prompts = settings.prompts
    if prompts == "synthetic" and cfg.data.path == "synthetic":
        from dlm.data import synthetic_dir

        prompts = str(synthetic_dir(cfg.data) / "test.jsonl")  # the split held out from this point's training
    run_bench(checkpoint, ar_baseline=settings.ar_baseline, thresholds=settings.thresholds,
              batch_sizes=settings.batch_sizes, gen_length=settings.gen_length,
              no_cache_thresholds=settings.no_cache_thresholds, repeats=settings.repeats, warmup=settings.warmup,
              prompts=prompts, num_prompts=settings.num_prompts, mlflow_run=run_id,
              tracking_uri=cfg.tracking.tracking_uri, output_dir=Path(cfg.output_dir) / "bench")


def eval_point(checkpoint: Path, settings: EvalSettings, cfg: ExperimentConfig, run_id: str,
               block_size: int | None = None) -> dict[str, float]:
    """`dlm.evaluate.evaluate` at one decode block size; metrics `eval/[decode_bs_<N>/]<task>/<metric>`
    and the results JSON (artifact `lm_eval/`) go into the point's run."""
    from mlflow.entities import Metric

    from dlm.evaluate import evaluate

    label = "eval" if block_size is None else f"decode_bs_{block_size}"
    output = Path(cfg.output_dir) / "eval" / f"{label}.json"
    decode = {"threshold": settings.threshold, **({"block_size": block_size} if block_size else {})}
    limit = settings.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluate(checkpoint, settings.tasks, num_fewshot=settings.num_fewshot, limit=limit,
                       batch_size=settings.batch_size, decode=decode, output=output, gen_kwargs=settings.gen_kwargs,
                       task_metadata={"synthetic_size": cfg.data.synthetic_size, "cache_dir": cfg.data.cache_dir,
                                      "synthetic_max_number": cfg.data.synthetic_max_number})
    metrics = results["dlm_metrics"]
    if block_size is not None:
        metrics = {k.replace("eval/", f"eval/{label}/", 1): v for k, v in metrics.items()}
    client = _client(cfg.tracking.tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, cfg.trainer.max_steps) for k, v in metrics.items()])
    client.log_artifact(run_id, str(output), artifact_path="lm_eval")
    return metrics


# -- launching --------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    sweep: str
    parent_run_id: str | None
    tracking_uri: str
    points: list[Point]
    outcomes: dict[str, PointOutcome] = field(default_factory=dict)  # point id -> outcome; empty on a dry run
    configs: dict[str, ExperimentConfig] = field(default_factory=dict)

    @property
    def failed(self) -> list[PointOutcome]:
        return [o for o in self.outcomes.values() if o.status == FAILED]


def run_sweep(sweep: SweepConfig | str | Path, *, launcher: str | None = None, max_parallel: int | None = None,
              dry_run: bool = False, callbacks: Sequence[L.Callback] = (), echo: bool = True) -> SweepResult:
    """Validate every point, then (unless `dry_run`) run the pending ones under the parent run.

    `callbacks` are extra Lightning callbacks for every point's training; local launcher only (tests use
    one to simulate a crash). A failed point is reported in the result, the others still run.
    """
    sweep = sweep if isinstance(sweep, SweepConfig) else load_sweep(sweep)
    sweep.launcher, sweep.max_parallel = launcher or sweep.launcher, max_parallel or sweep.max_parallel
    check_sweep(sweep)
    in_process = sweep.launcher == "local" and sweep.max_parallel == 1
    _require(not callbacks or in_process, "launcher", sweep.launcher, "extra callbacks need the local launcher, max_parallel=1")
    points = expand(sweep)
    configs = validate_sweep(sweep)
    uri, experiment = tracking_target(configs)
    if dry_run:
        result = SweepResult(sweep.name, None, uri, points, configs=configs)
        if echo:
            print(format_plan(sweep, points, configs, _done_without_creating(sweep.name, uri)))
        return result
    parent = ensure_parent(sweep, points, uri, experiment)
    done = finished_points(uri, parent)
    outcomes = {p.id: PointOutcome(p.id, "skipped", done[p.id]) for p in points if p.id in done}
    pending = [p for p in points if p.id not in done]
    if echo:
        print(f"sweep {sweep.name}: {len(points)} points, {len(done)} done, {len(pending)} to run "
              f"({sweep.launcher} launcher); parent run {parent} ({uri})", flush=True)
    launch = _launch_local if in_process else _launch_submitit
    outcomes.update(launch(sweep, pending, parent, callbacks) if pending else {})
    result = SweepResult(sweep.name, parent, uri, points, {p.id: outcomes[p.id] for p in points}, configs)
    _client(uri).set_terminated(parent, "FAILED" if result.failed else "FINISHED")
    return result


def _launch_local(sweep: SweepConfig, points: Sequence[Point], parent: str,
                  callbacks: Sequence[L.Callback]) -> dict[str, PointOutcome]:
    outcomes = {}
    for point in points:
        try:
            outcomes[point.id] = run_point(sweep, point.id, parent, callbacks=callbacks)
        except Exception as err:  # one bad point must not cost the others; the summary names it
            traceback.print_exc()
            outcomes[point.id] = PointOutcome(point.id, FAILED, error=f"{type(err).__name__}: {err}")
    return outcomes


def _launch_submitit(sweep: SweepConfig, points: Sequence[Point], parent: str,
                     callbacks: Sequence[L.Callback] = ()) -> dict[str, PointOutcome]:
    """One submitit job per point; waits for all and turns each failed job into a failed outcome."""
    executor = build_executor(sweep, cluster="local" if sweep.launcher == "local" else sweep.slurm.cluster)
    # submitit's local executor starts every job it is given at once: hand it max_parallel at a time
    wave = sweep.max_parallel if executor.cluster == "local" else len(points)
    outcomes = {}
    for start in range(0, len(points), wave):
        chunk = points[start : start + wave]
        jobs = executor.map_array(run_point, [sweep] * len(chunk), [p.id for p in chunk], [parent] * len(chunk),
                                  [os.getcwd()] * len(chunk))
        for point, job in zip(chunk, jobs):
            print(f"point {point.id}: submitit job {job.job_id} (logs: {job.paths.stdout})", flush=True)
        for point, job in zip(chunk, jobs):
            try:
                outcomes[point.id] = job.result()
            except Exception as err:
                error = f"{_last_exception_line(str(err)) or type(err).__name__} (log: {job.paths.stderr})"
                outcomes[point.id] = PointOutcome(point.id, FAILED, error=error)
    return outcomes


def _last_exception_line(message: str) -> str:
    """`ValueError: ...` from submitit's FailedJobError text (traceback between two dashed rules)."""
    parts = re.split(r"\n-{10,}\n", message)
    trace = parts[1] if len(parts) > 2 else message
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def build_executor(sweep: SweepConfig, cluster: str | None = None) -> submitit.AutoExecutor:
    """`submitit.AutoExecutor` in `<output_dir>/submitit` with the sweep's slurm settings."""
    import submitit

    s = sweep.slurm
    executor = submitit.AutoExecutor(folder=Path(sweep.output_dir).resolve() / "submitit", cluster=cluster)
    params: dict[str, Any] = dict(name=f"dlm-sweep-{sweep.name}", timeout_min=s.timeout_min, nodes=s.nodes,
                                  gpus_per_node=s.gpus_per_node, tasks_per_node=max(1, s.gpus_per_node),
                                  cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb,
                                  slurm_array_parallelism=sweep.max_parallel, slurm_partition=s.partition)
    if s.additional:
        params["slurm_additional_parameters"] = dict(s.additional)
    executor.update_parameters(**params)
    return executor


def _done_without_creating(sweep_name: str, uri: str) -> dict[str, str]:
    if not _store_exists(uri):
        return {}
    client = _client(uri)
    parent = find_parent(client, sweep_name)
    return finished_points(uri, parent.info.run_id) if parent else {}


def format_plan(sweep: SweepConfig, points: Sequence[Point], configs: dict[str, ExperimentConfig],
                done: dict[str, str]) -> str:
    """The dry run's listing: one line per point with its swept values and whether it is done."""
    width = max(len(p.id) for p in points)
    lines = [f"sweep {sweep.name}: {len(points)} points, all configs valid; base {sweep.experiment}",
             f"output {sweep.output_dir}, launcher {sweep.launcher} (max_parallel {sweep.max_parallel})"]
    for p in points:
        status = "done" if p.id in done else "pending"
        values = " ".join(f"{k}={_slug(v) if isinstance(v, (bool, float, list)) else v}" for k, v in p.values.items())
        lines.append(f"  {p.id:<{width}}  {status:<7}  {values}  (max_steps {configs[p.id].trainer.max_steps})")
    return "\n".join(lines)


# -- command line (wired into dlm.cli as `dlm sweep`) -----------------------------------------------------
def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`dlm sweep SWEEP.yaml [key=value ...] [--dry-run] [--launcher local|slurm] [--max-parallel N]`."""
    parser.add_argument("sweep", help="sweep YAML, e.g. sweeps/attention_pattern_tiny.yaml")
    parser.add_argument("sweep_overrides", nargs="*", metavar="key=value",
                        help="overrides of the sweep file itself, e.g. eval.limit=20 output_dir=/tmp/s")
    parser.add_argument("--dry-run", action="store_true", help="list and validate the points; run nothing")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="override the sweep's launcher")
    parser.add_argument("--max-parallel", type=int, help="points running at once (slurm array parallelism)")
    parser.add_argument("--no-report", action="store_true", help="skip the summary table and plots at the end")
    return parser


def run_sweep_from_args(args: argparse.Namespace) -> SweepResult:
    sweep = load_sweep(args.sweep, args.sweep_overrides)
    result = run_sweep(sweep, launcher=args.launcher, max_parallel=args.max_parallel, dry_run=args.dry_run)
    if args.dry_run:
        return result
    for o in result.outcomes.values():
        print(f"  {o.point_id}: {o.status}" + (f" (run {o.run_id})" if o.run_id else "") + (f": {o.error}" if o.error else ""))
    if not args.no_report:
        from dlm.report import report

        report(sweep.name, tracking_uri=result.tracking_uri)
    if result.failed:
        raise SystemExit(f"error: {len(result.failed)} of {len(result.points)} points failed "
                         f"({', '.join(o.point_id for o in result.failed)}); re-run the same command to retry them")
    return result


if __name__ == "__main__":
    parser = add_sweep_arguments(argparse.ArgumentParser(prog="python -m dlm.sweep", description="Run a sweep."))
    try:
        run_sweep_from_args(parser.parse_args())
    except ConfigError as err:
        sys.exit(f"error: {err}")
