"""Where a sweep's points run: one after another in this process, or one submitit job each (slurm,
or submitit's local executor: subprocesses on this machine, `max_parallel` at a time).

The job function is passed in (`dlm.experiments.sweep.run_point`), so this module knows nothing of
what a point does.
"""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dlm.experiments.points import FAILED, Point
from dlm.settings.sweep import SweepConfig

if TYPE_CHECKING:
    import submitit

PointJob = Callable[..., Any]
"""`run_point(sweep, point_id, parent_run_id, cwd=None, *, callbacks=())` -> PointOutcome."""


def launch_local(job: PointJob, outcome: type, sweep: SweepConfig, points: Sequence[Point],
                 parent: str, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """In this process, one point after another; a failed point is an outcome, not an exception."""
    outcomes = {}
    for point in points:
        try:
            outcomes[point.id] = job(sweep, point.id, parent, callbacks=callbacks)
        # one bad point must not cost the others; the summary names it
        except Exception as err:
            traceback.print_exc()
            outcomes[point.id] = outcome(point.id, FAILED, error=f"{type(err).__name__}: {err}")
    return outcomes


def launch_submitit(job: PointJob, outcome: type, sweep: SweepConfig, points: Sequence[Point],
                    parent: str, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """One submitit job per point; waits for all and turns each failed job into a failed outcome."""
    cluster = "local" if sweep.launcher == "local" else sweep.slurm.cluster
    executor = build_executor(sweep, cluster=cluster)
    # submitit's local executor starts every job it is given at once: hand it max_parallel at a time
    wave = sweep.max_parallel if executor.cluster == "local" else len(points)
    outcomes = {}
    for start in range(0, len(points), wave):
        chunk = points[start : start + wave]
        jobs = executor.map_array(job, [sweep] * len(chunk), [p.id for p in chunk],
                                  [parent] * len(chunk), [os.getcwd()] * len(chunk))
        for point, submitted in zip(chunk, jobs):
            print(f"point {point.id}: submitit job {submitted.job_id} "
                  f"(logs: {submitted.paths.stdout})", flush=True)
        for point, submitted in zip(chunk, jobs):
            try:
                outcomes[point.id] = submitted.result()
            except Exception as err:
                cause = _last_exception_line(str(err)) or type(err).__name__
                error = f"{cause} (log: {submitted.paths.stderr})"
                outcomes[point.id] = outcome(point.id, FAILED, error=error)
    return outcomes


def _last_exception_line(message: str) -> str:
    """`ValueError: ...` from submitit's FailedJobError text (traceback between two dashed
    rules)."""
    parts = re.split(r"\n-{10,}\n", message)
    trace = parts[1] if len(parts) > 2 else message
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def build_executor(sweep: SweepConfig, cluster: str | None = None) -> submitit.AutoExecutor:
    """`submitit.AutoExecutor` in `<output_dir>/submitit` with the sweep's slurm settings."""
    import submitit

    s = sweep.slurm
    folder = Path(sweep.output_dir).resolve() / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = dict(name=f"dlm-sweep-{sweep.name}", timeout_min=s.timeout_min,
                                  nodes=s.nodes, gpus_per_node=s.gpus_per_node,
                                  tasks_per_node=max(1, s.gpus_per_node),
                                  cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb,
                                  slurm_array_parallelism=sweep.max_parallel,
                                  slurm_partition=s.partition)
    if s.additional:
        params["slurm_additional_parameters"] = dict(s.additional)
    executor.update_parameters(**params)
    return executor
