"""`dlm sweep`: a grid of experiment configs, each point trained, benchmarked and evaluated in its
own nested MLflow run under one parent run, resumable after a crash.

The sweep file's schema is `dlm.settings.sweep`; its expansion into points and the checks of every
point's config, `dlm.experiments.points`; the MLflow parent and child runs,
`dlm.experiments.sweep_runs`; where the points run, `dlm.experiments.launchers`. This module runs
one point and the whole sweep.

Order of work. Every point's config goes through `load_config` first (plus the eval tasks and a
local base checkpoint), so a typo fails the whole sweep in one line, naming the point, before any
run exists. Then one parent run (tags `dlm.sweep=<name>`, `dlm.role=parent`; found again by those
tags on a re-run) and per pending point: train (with `WeightDriftCallback`) -> bench -> eval, all
into the point's child run (tags `mlflow.parentRunId`, `dlm.sweep`, `dlm.point`), which ends with
the tag `dlm.status=done`.

Resuming. A re-run skips points whose child has `dlm.status=done`. A point killed mid-training
continues from `<point dir>/checkpoints/last.ckpt` in its same child run (`dlm train`'s
`resume=true` reads the run id from `<point dir>/mlflow_run.json`); a point whose `final/` export
exists is not trained again, only benchmarked and evaluated. A failed point does not stop the
others; the sweep reports it and exits non-zero.

Launchers. `local`: points run one after another in this process (with `max_parallel` > 1: as
subprocesses through submitit's local executor, `max_parallel` at a time). `slurm`: one submitit job
per point (`submitit.AutoExecutor`, `slurm_array_parallelism=max_parallel`) calling
:func:`run_point`; with `slurm.cluster: local` submitit's local executor runs each job as a
subprocess on this machine (how the tests run it). That executor starts every job it is given at
once, so it is handed `max_parallel` jobs at a time. Multi-GPU / multi-node training inside a point
is Lightning's (`trainer.strategy=ddp|fsdp`, `trainer.devices`, `trainer.num_nodes`) under the slurm
launcher, with one task per GPU; only rank 0 benchmarks, evaluates and writes tags.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dlm.data.synthetic import synthetic_dir
from dlm.evaluation.evaluate import evaluate
from dlm.experiments.launchers import launch_local, launch_submitit
from dlm.experiments.points import (
    DONE,
    FAILED,
    RUNNING,
    Point,
    expand,
    point_config,
    slug,
    validate_sweep,
)
from dlm.experiments.sweep_runs import (
    done_points_if_any,
    ensure_parent,
    finished_points,
    set_status,
)
from dlm.measurement.bench import run_bench
from dlm.settings import SYNTHETIC, ConfigError, ExperimentConfig, LogTarget, check
from dlm.settings.sweep import (
    SweepBench,
    SweepConfig,
    SweepEval,
    SweepRunConfig,
    check_sweep,
    load_sweep,
)
from dlm.tensor import patterns
from dlm.tracking import lock, runs
from dlm.training.callbacks.drift import WeightDriftCallback
from dlm.training.trainer import train

if TYPE_CHECKING:
    import lightning as L


def tracking_target(configs: dict[str, ExperimentConfig]) -> tuple[str, str]:
    """(tracking URI, MLflow experiment) shared by the parent and every child."""
    first = next(iter(configs.values()))
    return first.tracking.tracking_uri, first.tracking.experiment


@dataclass
class PointOutcome:
    point_id: str
    status: str  # done | skipped | failed
    run_id: str | None = None
    error: str | None = None


def run_point(sweep: SweepConfig | str | Path, point_id: str, parent_run_id: str | None = None,
              cwd: str | None = None, *, callbacks: Sequence[L.Callback] = ()) -> PointOutcome:
    """Train -> bench -> eval one point into its child run, then tag it done. Top-level and
    picklable: the slurm launcher's job function. Skips a point already done; resumes a half-trained
    one."""
    if cwd:
        # relative paths in the sweep (outputs/, sqlite:///mlflow.db) mean the launcher's cwd
        os.chdir(cwd)
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
    # resuming a killed or failed point
    if run_id and _rank() == 0:
        set_status(uri, run_id, RUNNING)
    try:
        run_id = _train(cfg, sweep, callbacks)
        if _rank() == 0:
            _bench_and_eval(sweep, cfg, run_id)
            set_status(uri, run_id, DONE, terminate="FINISHED")
        return PointOutcome(point.id, DONE, run_id)
    except Exception as err:
        run_id = run_id or _recorded_run(cfg)
        if run_id and _rank() == 0:
            set_status(uri, run_id, FAILED, error=f"{type(err).__name__}: {err}",
                       terminate="FAILED")
        raise


def _train(cfg: ExperimentConfig, sweep: SweepConfig, callbacks: Sequence[L.Callback]) -> str:
    """Train unless `final/` (written only at the end of training) exists; the child run's id."""
    if (Path(cfg.output_dir) / "final" / "dlm.yaml").is_file() and _recorded_run(cfg):
        return _recorded_run(cfg)
    result = train(cfg, callbacks=[WeightDriftCallback(sweep.drift_every_n_steps), *callbacks])
    return result.run_id


def _recorded_run(cfg: ExperimentConfig) -> str | None:
    saved = runs.read_run_file(cfg.output_dir)
    return saved["run_id"] if saved else None


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


def bench_point(checkpoint: Path, settings: SweepBench, cfg: ExperimentConfig,
                run_id: str) -> None:
    """`run_bench` on the point's export, logging `bench/<setting>/<metric>` into its run."""
    prompts = settings.prompts
    if prompts == SYNTHETIC and cfg.data.path == SYNTHETIC:
        # the split held out from this point's training
        prompts = str(synthetic_dir(cfg.data) / "test.jsonl")
    output_dir = str(Path(cfg.output_dir) / "bench")
    # speculative rows where the point's clean half is causal; its AR mode everywhere
    speculative = settings.speculative and patterns.of(cfg.attention).verifies
    bench = dataclasses.replace(settings, prompts=prompts, output_dir=output_dir,
                                speculative=speculative,
                                ar_mode=settings.ar_mode or settings.speculative)
    run_bench(checkpoint, bench, log=LogTarget(run_id, cfg.tracking.tracking_uri))


def eval_point(checkpoint: Path, settings: SweepEval, cfg: ExperimentConfig, run_id: str,
               block_size: int | None = None) -> dict[str, float]:
    """`evaluate` at one decode block size; metrics `eval/[decode_block_<N>/]<task>/<metric>` and
    the results JSON (artifact `lm_eval/`) go into the point's run."""
    label = "eval" if block_size is None else f"decode_block_{block_size}"
    output = Path(cfg.output_dir) / "eval" / f"{label}.json"
    decode = {**settings.decode, **({"block_size": block_size} if block_size else {})}
    point_settings = dataclasses.replace(settings, decode=decode, output=str(output))
    task_metadata = {"synthetic_size": cfg.data.synthetic_size, "cache_dir": cfg.data.cache_dir,
                     "synthetic_max_number": cfg.data.synthetic_max_number}
    results = evaluate(checkpoint, point_settings, task_metadata=task_metadata)
    metrics = results["dlm_metrics"]
    if block_size is not None:
        metrics = {k.replace("eval/", f"eval/{label}/", 1): v for k, v in metrics.items()}
    runs.log_metrics(run_id, cfg.tracking.tracking_uri, metrics, step=cfg.trainer.max_steps)
    runs.log_artifacts(run_id, cfg.tracking.tracking_uri, [output], "lm_eval")
    return metrics
# -- the whole sweep -------------------------------------------------------------------------------
@dataclass
class SweepResult:
    sweep: str
    parent_run_id: str | None
    tracking_uri: str
    points: list[Point]
    # point id -> outcome; empty on a dry run
    outcomes: dict[str, PointOutcome] = field(default_factory=dict)
    configs: dict[str, ExperimentConfig] = field(default_factory=dict)

    @property
    def failed(self) -> list[PointOutcome]:
        return [o for o in self.outcomes.values() if o.status == FAILED]


def run_sweep(sweep: SweepConfig | str | Path, run: SweepRunConfig | None = None, *,
              callbacks: Sequence[L.Callback] = (), echo: bool = True) -> SweepResult:
    """Validate every point, then (unless `dry_run`) run the pending ones under the parent run.

    `callbacks` are extra Lightning callbacks for every point's training; local launcher only (tests
    use one to simulate a crash). A failed point is reported in the result, the others still run.
    """
    run = run or SweepRunConfig()
    sweep = sweep if isinstance(sweep, SweepConfig) else load_sweep(sweep)
    sweep.launcher = run.launcher or sweep.launcher
    sweep.max_parallel = run.max_parallel or sweep.max_parallel
    check_sweep(sweep)
    in_process = sweep.launcher == "local" and sweep.max_parallel == 1
    check(not callbacks or in_process, "launcher", sweep.launcher,
          "extra callbacks need the local launcher, max_parallel=1")
    points = expand(sweep)
    configs = validate_sweep(sweep)
    uri, experiment = tracking_target(configs)
    if run.dry_run:
        result = SweepResult(sweep.name, None, uri, points, configs=configs)
        if echo:
            print(format_plan(sweep, points, configs, done_points_if_any(sweep.name, uri)))
        return result
    # a second process refuses here
    with lock.folder_lock(sweep.output_dir, f"sweep {sweep.name!r}"):
        return _run_pending(sweep, points, configs, uri, experiment, callbacks, echo=echo,
                            in_process=in_process)


def _run_pending(sweep: SweepConfig, points: list[Point], configs: dict[str, ExperimentConfig],
                 uri: str, experiment: str, callbacks: Sequence[L.Callback], *, echo: bool,
                 in_process: bool) -> SweepResult:
    """The parent run, then every point not yet done."""
    parent = ensure_parent(sweep, points, uri, experiment)
    done = finished_points(uri, parent)
    outcomes = {p.id: PointOutcome(p.id, "skipped", done[p.id]) for p in points if p.id in done}
    pending = [p for p in points if p.id not in done]
    if echo:
        print(f"sweep {sweep.name}: {len(points)} points, {len(done)} done, {len(pending)} to run "
              f"({sweep.launcher} launcher); parent run {parent} ({uri})", flush=True)
    launch = launch_local if in_process else launch_submitit
    if pending:
        outcomes.update(launch(run_point, PointOutcome, sweep, pending, parent, callbacks))
    ordered = {p.id: outcomes[p.id] for p in points}
    result = SweepResult(sweep.name, parent, uri, points, ordered, configs)
    runs.client(uri).set_terminated(parent, "FAILED" if result.failed else "FINISHED")
    return result


def format_plan(sweep: SweepConfig, points: Sequence[Point], configs: dict[str, ExperimentConfig],
                done: dict[str, str]) -> str:
    """The dry run's listing: one line per point with its swept values and whether it is done."""
    width = max(len(p.id) for p in points)
    lines = [f"sweep {sweep.name}: {len(points)} points, all configs valid; "
             f"base {sweep.experiment}",
             f"output {sweep.output_dir}, launcher {sweep.launcher} "
             f"(max_parallel {sweep.max_parallel})"]
    for p in points:
        status = "done" if p.id in done else "pending"
        values = " ".join(f"{k}={slug(v) if isinstance(v, (bool, float, list)) else v}"
                          for k, v in p.values.items())
        max_steps = configs[p.id].trainer.max_steps
        lines.append(f"  {p.id:<{width}}  {status:<7}  {values}  (max_steps {max_steps})")
    return "\n".join(lines)
