"""`dlm sweep`: a grid of experiment configs, each point trained, benchmarked and evaluated in its own
nested MLflow run under one parent run, resumable after a crash.

The sweep file's schema, its expansion into points and the checks of every point's config live in
:mod:`dlm.sweep_config` (re-exported here); this module runs the points and keeps their MLflow runs.

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
import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import OmegaConf

from dlm.settings.experiment import ConfigError, ExperimentConfig
from dlm.settings.sweep import (
    DONE, FAILED, LAUNCHERS, MANAGED_KEYS, POINT_ID, RUNNING, BenchSettings, EvalSettings, Point, SlurmSettings,
    SweepConfig, SweepTracking, _require, _slug, check_sweep, expand, load_sweep, point_config, point_id,
    short_names, validate_sweep,
)

if TYPE_CHECKING:
    import lightning as L
    import submitit
    from mlflow import MlflowClient
    from mlflow.entities import Run

__all__ = [
    # moved to dlm.sweep_config, re-exported so `from dlm.experiments.sweep import ...` keeps working
    "DONE", "FAILED", "LAUNCHERS", "MANAGED_KEYS", "POINT_ID", "RUNNING", "BenchSettings", "EvalSettings", "Point",
    "SlurmSettings", "SweepConfig", "SweepTracking", "check_sweep", "expand", "load_sweep", "point_config",
    "point_id", "short_names", "validate_sweep",
    # this module
    "PointOutcome", "SweepResult", "add_sweep_arguments", "bench_point", "build_executor", "ensure_parent",
    "eval_point", "experiment_id", "find_parent", "finished_points", "format_plan", "run_point", "run_sweep",
    "run_sweep_from_args", "tracking_target",
]


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
    from dlm.training.callbacks.drift import WeightDriftCallback
    from dlm.training.trainer import train

    result = train(cfg, callbacks=[WeightDriftCallback(sweep.drift_every_n_steps), *callbacks])
    return result.run_id


def _recorded_run(cfg: ExperimentConfig) -> str | None:
    from dlm.training.trainer import RUN_ID_FILE

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
    from dlm.measurement.bench import run_bench

    prompts = settings.prompts
    if prompts == "synthetic" and cfg.data.path == "synthetic":
        from dlm.data.datamodule import synthetic_dir

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

    from dlm.evaluation.evaluate import evaluate

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
        from dlm.experiments.report import report

        report(sweep.name, tracking_uri=result.tracking_uri)
    if result.failed:
        raise SystemExit(f"error: {len(result.failed)} of {len(result.points)} points failed "
                         f"({', '.join(o.point_id for o in result.failed)}); re-run the same command to retry them")
    return result
