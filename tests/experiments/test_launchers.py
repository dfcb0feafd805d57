"""`dlm.experiments.launchers`: points run one after another in this process (a raising point becomes a failed
outcome), or as submitit jobs (real jobs through submitit's local executor), with the sweep's slurm settings.

Plain job functions stand in for `run_point`: the launchers only call them, so no training is needed here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dlm.experiments.launchers import _last_exception_line, build_executor, launch_local, launch_submitit
from dlm.experiments.points import FAILED, Point
from dlm.settings.sweep import SweepConfig, load_sweep

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments" / "tiny.yaml")
POINTS = [Point("first", {"attention.pattern": "block"}, 0), Point("broken", {"attention.pattern": "causal"}, 1),
          Point("last", {"attention.pattern": "block_clean"}, 2)]


@dataclass
class Outcome:
    """What a job returns and what a launcher builds for a failed point (`PointOutcome`'s fields)."""

    point_id: str
    status: str
    run_id: str | None = None
    error: str | None = None


def job(sweep: SweepConfig, point_id: str, parent: str, cwd: str | None = None, *, callbacks=()) -> Outcome:
    """Top level and picklable, like `run_point`: the `broken` point raises."""
    if point_id == "broken":
        raise ValueError(f"point {point_id} of {sweep.name} is broken")
    return Outcome(point_id, "done", f"{parent}/{point_id}/{len(callbacks)} callbacks/cwd={cwd}")


def write_sweep_file(root: Path, **sections) -> Path:
    """A small sweep file over experiments/tiny.yaml (not run: the launchers take its points as given)."""
    spec = {"name": "launch_test", "experiment": TINY, "output_dir": str(root / "out"),
            "grid": {"attention.pattern": ["block", "causal", "block_clean"]}, **sections}
    path = root / "launch_test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# -- in this process ------------------------------------------------------------------------------------------
def test_launch_local_turns_an_exception_into_a_failed_outcome_and_runs_the_others(tmp_path, capsys):
    sweep = load_sweep(write_sweep_file(tmp_path))
    outcomes = launch_local(job, Outcome, sweep, POINTS, "parent-1", callbacks=["cb"])
    assert list(outcomes) == ["first", "broken", "last"]
    assert outcomes["first"] == Outcome("first", "done", "parent-1/first/1 callbacks/cwd=None")
    assert outcomes["broken"] == Outcome("broken", FAILED, error="ValueError: point broken of launch_test is broken")
    assert outcomes["last"].status == "done"
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("ValueError: point broken of launch_test is broken")


def test_launch_local_passes_the_sweep_parent_and_callbacks_to_every_point(tmp_path):
    sweep = load_sweep(write_sweep_file(tmp_path))
    calls = []

    def record(sweep_arg, point_id, parent, *, callbacks):
        calls.append((sweep_arg is sweep, point_id, parent, tuple(callbacks)))
        return Outcome(point_id, "done")

    launch_local(record, Outcome, sweep, POINTS[:2], "p", callbacks=("a", "b"))
    assert calls == [(True, "first", "p", ("a", "b")), (True, "broken", "p", ("a", "b"))]


def test_launch_local_lets_an_interrupt_stop_the_sweep(tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch_local(interrupted, Outcome, load_sweep(write_sweep_file(tmp_path)), POINTS, "p")


# -- submitit -------------------------------------------------------------------------------------------------
def test_launch_submitit_runs_each_point_as_a_local_job_and_reports_the_failed_one(tmp_path, monkeypatch, capsys):
    """submitit's local executor: real subprocesses (one wave of three); they import this module to unpickle `job`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    sweep = load_sweep(write_sweep_file(tmp_path, launcher="local", max_parallel=3, slurm={"timeout_min": 5}))
    outcomes = launch_submitit(job, Outcome, sweep, POINTS, "parent-2")
    assert outcomes["first"] == Outcome("first", "done", f"parent-2/first/0 callbacks/cwd={tmp_path}")
    assert outcomes["last"].status == "done"
    broken = outcomes["broken"]
    assert broken.status == FAILED
    assert broken.error.startswith("ValueError: point broken of launch_test is broken (log: ")
    log = Path(broken.error.split("(log: ")[1].rstrip(")"))
    assert log.parent == tmp_path / "out" / "submitit" and log.name.endswith("_log.err")
    assert "ValueError: point broken of launch_test is broken" in log.read_text()
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("point ")] == [
        "point first", "point broken", "point last"]


def test_build_executor_puts_jobs_in_the_sweep_output_and_sets_the_common_parameters(tmp_path):
    sweep = load_sweep(write_sweep_file(tmp_path, slurm={"nodes": 2, "gpus_per_node": 4, "cpus_per_task": 6,
                                                          "timeout_min": 30, "mem_gb": 64}))
    executor = build_executor(sweep, cluster="debug")
    assert executor.cluster == "debug" and executor.folder == (tmp_path / "out" / "submitit").resolve()
    assert executor._executor.parameters == {"name": "dlm-sweep-launch_test", "timeout_min": 30, "nodes": 2,
                                             "gpus_per_node": 4, "tasks_per_node": 4, "cpus_per_task": 6,
                                             "mem_gb": 64.0}


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch) -> None:
    """submitit's slurm executor only checks that `srun` exists; nothing is submitted here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_build_executor_writes_the_sweeps_slurm_settings_into_the_sbatch_file(tmp_path, srun_on_path):
    sweep = load_sweep(write_sweep_file(
        tmp_path, launcher="slurm", max_parallel=3,
        slurm={"partition": "gpu", "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 6, "timeout_min": 30,
               "mem_gb": 64, "additional": {"account": "proj", "qos": "high"}}))
    executor = build_executor(sweep, cluster="slurm")
    assert executor.cluster == "slurm" and executor._executor.parameters["array_parallelism"] == 3
    sbatch = executor._executor._make_submission_file_text("python -m job", "uid").splitlines()
    assert {"#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
            "#SBATCH --cpus-per-task=6", "#SBATCH --time=30", "#SBATCH --mem=64GB", "#SBATCH --account=proj",
            "#SBATCH --qos=high", "#SBATCH --job-name=dlm-sweep-launch_test"} <= set(sbatch)


def test_build_executor_without_gpus_runs_one_task_per_node_and_leaves_unset_options_out(tmp_path, srun_on_path):
    executor = build_executor(load_sweep(write_sweep_file(tmp_path, launcher="slurm")), cluster="slurm")
    params = executor._executor.parameters
    assert (params["ntasks_per_node"], params["gpus_per_node"], params["nodes"], params["time"]) == (1, 0, 1, 240)
    assert params["array_parallelism"] == 1
    assert not {"partition", "mem", "additional_parameters"} & set(params)


# -- submitit's error text ------------------------------------------------------------------------------------
FAILED_JOB_TEXT = """Job (task=0) failed during processing with trace:
----------------------
Traceback (most recent call last):
  File "/venv/site-packages/submitit/core/submission.py", line 55, in process_job
    result = delayed.result()
  File "/repo/dlm/experiments/sweep.py", line 80, in run_point
    raise ConfigError(msg)
dlm.settings.errors.ConfigError: trainer.strategy='no_such_strategy': unknown strategy

----------------------
You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:
  - /out/submitit/17_0_log.err
  - /out/submitit/17_0_log.out"""


def test_last_exception_line_is_the_exception_between_submitits_dashed_rules():
    assert _last_exception_line(FAILED_JOB_TEXT) == (
        "dlm.settings.errors.ConfigError: trainer.strategy='no_such_strategy': unknown strategy")


def test_last_exception_line_without_the_rules_is_the_last_line_of_the_message():
    assert _last_exception_line("job timed out\n  after 10 minutes  \n\n") == "after 10 minutes"
    assert _last_exception_line("") == ""
