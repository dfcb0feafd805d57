"""`dlm sweep`: validation before any run (the dry run), and real tiny sweeps through MLflow: parent + children,
a killed and a crashed point resumed in their own runs, finished points skipped, and the slurm launcher through
submitit's local executor. The sweep file's schema, expansion and checks: tests/test_sweep_config.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
import yaml

from dlm.experiments.sweep import SweepResult, run_sweep
from dlm.experiments.sweep_runs import find_parent, finished_points
from dlm.settings import ConfigError
from dlm.settings.sweep import SweepRunConfig
from tests.helpers import SMALL_MODEL, save_tiny_ar

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments" / "tiny.yaml")
SWEEP_NAME = "tiny_test"
POINTS = ["pattern-block", "pattern-block_clean"]
FAST = ["data.synthetic_size=400", "data.max_length=32", "data.batch_size=4", "trainer.max_steps=4",
        "trainer.val_every_n_steps=2", "trainer.limit_val_batches=2", "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "trainer.throughput_window=2",
        "trainer.accelerator=cpu", "trainer.devices=1", *SMALL_MODEL]
"""tests/test_train.py's tiny run: 4 optimizer steps, checkpoints at 2 and 4."""


# -- helpers shared with tests/test_report.py and tests/test_notebook.py ---------------------------------
def write_sweep(root: Path, ar: Path, name: str = SWEEP_NAME, *, grid: dict | None = None, points: list | None = None,
                overrides: list[str] = (), **sections) -> Path:
    """A sweep YAML over experiments/tiny.yaml at test size, its outputs and MLflow store under `root`."""
    spec = {"name": name, "experiment": TINY, "output_dir": str(root / "out" / name),
            "overrides": [f"model.name_or_path={ar}", f"data.cache_dir={root / 'data'}", *FAST, *overrides],
            "grid": {"attention.pattern": ["block", "block_clean"]} if grid is None and points is None
                    else (grid or {}),
            "points": points or [],
            "eval": {"limit": 4, "batch_size": 4, "gen_kwargs": "max_gen_toks=8"},
            "bench": {"thresholds": [0.5, 0.9], "max_new_tokens": 8, "num_prompts": 2, "warmup": 0, "repeats": 1,
                      "batch_sizes": [1], "no_cache_thresholds": []},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "sweeps"}}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class RaiseAt(L.Callback):
    """Raises in one point's training at `step`: a crash that Python sees (the run is marked FAILED)."""

    def __init__(self, point: str, step: int) -> None:
        self.point, self.step = point, step

    def on_train_batch_start(self, trainer, *args) -> None:
        if Path(trainer.default_root_dir).name == self.point and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class KillAt(RaiseAt):
    """SIGKILLs the process at `step`: nothing gets to clean up, like an OOM kill or a node lost."""

    def on_train_batch_start(self, trainer, *args) -> None:
        if Path(trainer.default_root_dir).name == self.point and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TinySweep:
    """One tiny 2-point sweep run three times: killed mid-way, re-run with a crash, re-run to the end."""

    root: Path
    path: Path
    tracking_uri: str
    killed_rc: int = 0
    killed_run: str = ""  # the second point's child run id after the kill
    killed_tags: dict = field(default_factory=dict)
    crashed: SweepResult | None = None
    final: SweepResult | None = None
    failed_tags: dict = field(default_factory=dict)


_CACHE: dict[Path, TinySweep] = {}


def tiny_sweep(root: Path) -> TinySweep:
    """Built once per test session (the report and notebook tests read the same store)."""
    if root in _CACHE:
        return _CACHE[root]
    root.mkdir(parents=True, exist_ok=True)
    ar = save_tiny_ar(root / "ar")
    path = write_sweep(root, ar)
    state = TinySweep(root, path, f"sqlite:///{root / 'mlflow.db'}")
    code = ("from tests.experiments.test_sweep import KillAt; from dlm.experiments.sweep import run_sweep; "
            f"run_sweep({str(path)!r}, callbacks=[KillAt({POINTS[1]!r}, 3)])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    state.killed_rc = proc.returncode
    client = mlflow.MlflowClient(state.tracking_uri)
    killed = _child(client, POINTS[1])
    state.killed_run, state.killed_tags = killed.info.run_id, dict(killed.data.tags)
    state.crashed = run_sweep(path, callbacks=[RaiseAt(POINTS[1], 3)], echo=False)
    state.failed_tags = dict(client.get_run(state.killed_run).data.tags)
    state.final = run_sweep(path, echo=False)
    _CACHE[root] = state
    return state


def _child(client: mlflow.MlflowClient, point: str, sweep: str = SWEEP_NAME):
    parent = find_parent(client, sweep)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`dlm.point` = '{point}'")
    assert len(runs) == 1, f"{len(runs)} runs for {point}"
    return runs[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> TinySweep:
    return tiny_sweep(tmp_path_factory.getbasetemp() / "tiny_sweep")


# -- validation before anything runs ----------------------------------------------------------------
def test_dry_run_lists_and_validates_every_point_without_creating_runs(tmp_path, ar_checkpoint, capsys):
    result = run_sweep(write_sweep(tmp_path, ar_checkpoint), SweepRunConfig(dry_run=True))
    out = capsys.readouterr().out
    assert f"sweep {SWEEP_NAME}: 2 points, all configs valid" in out
    assert "pattern-block        pending  attention.pattern=block " in out
    assert sorted(result.configs) == POINTS and result.parent_run_id is None and not result.outcomes
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_an_invalid_point_fails_the_sweep_before_any_run_naming_point_and_key(tmp_path, ar_checkpoint):
    path = write_sweep(tmp_path, ar_checkpoint,
                       grid={"attention.pattern": ["block", "blok"], "objective.shift": [True]})
    with pytest.raises(ConfigError, match=r"^sweep point 'pattern-blok_shift-true': attention.pattern='blok': "
                                          r"unknown pattern; allowed: bidirectional, block, block_clean, "
                                          r"block_window, causal$"):
        run_sweep(path)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


# -- real tiny sweeps -------------------------------------------------------------------------------
def test_sweep_makes_one_parent_and_a_child_per_point_with_train_bench_eval_metrics(swept):
    client = mlflow.MlflowClient(swept.tracking_uri)
    parent = find_parent(client, SWEEP_NAME)
    assert parent.data.tags["dlm.points"] == '["pattern-block", "pattern-block_clean"]'
    assert parent.info.status == "FINISHED"
    assert finished_points(swept.tracking_uri, parent.info.run_id).keys() == set(POINTS)
    for point, pattern in zip(POINTS, ["block", "block_clean"]):
        run = _child(client, point)
        assert run.info.status == "FINISHED" and run.data.tags["dlm.status"] == "done"
        assert run.data.tags["dlm.sweep"] == SWEEP_NAME and run.data.tags["dlm.role"] == "child"
        assert run.data.params["attention.pattern"] == pattern and run.data.tags["mlflow.runName"] == point
        metrics = set(run.data.metrics)
        assert {"train/loss", "val/loss", "drift/layer_00/attention", "drift/mlp_mean"} <= metrics
        assert {"bench/dlm_batch1_t0.9/tpf", "bench/dlm_batch1_t0.5/tokens_per_sec",
                "bench/ar_batch1/tokens_per_sec"} <= metrics
        assert "eval/gsm8k_synthetic/exact_match_strict-match" in metrics
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 4  # a loss curve, not a number
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "bench", "lm_eval"} <= artifacts


def test_a_killed_point_resumes_in_its_own_run_from_its_last_checkpoint(swept):
    assert swept.killed_rc == -signal.SIGKILL
    assert swept.killed_tags["dlm.status"] == "running"  # SIGKILL: nothing marked the point done or failed
    client = mlflow.MlflowClient(swept.tracking_uri)
    run = _child(client, POINTS[1])
    assert run.info.run_id == swept.killed_run  # killed, crashed, finished: one run throughout
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    # killed in step 3 and crashed in step 3 after resuming from the step-2 checkpoint both times; the steps re-run
    # after each resume are not logged again (dlm.training.resume)
    assert steps == [0, 1, 2, 3]
    ckpt = torch.load(swept.root / "out" / SWEEP_NAME / POINTS[1] / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4


def test_a_rerun_skips_finished_points_and_reports_failed_ones(swept):
    crashed, final = swept.crashed, swept.final
    first_run = _child(mlflow.MlflowClient(swept.tracking_uri), POINTS[0]).info.run_id
    assert crashed.outcomes[POINTS[0]].status == "skipped" and crashed.outcomes[POINTS[0]].run_id == first_run
    assert crashed.outcomes[POINTS[1]].status == "failed"
    assert crashed.outcomes[POINTS[1]].error == "RuntimeError: simulated crash"
    assert (swept.failed_tags["dlm.status"] == "failed"
            and swept.failed_tags["dlm.error"] == "RuntimeError: simulated crash")
    assert [o.status for o in final.outcomes.values()] == ["skipped", "done"]
    assert crashed.parent_run_id == final.parent_run_id  # found again by its tags


def test_slurm_launcher_runs_each_point_as_a_submitit_job_and_reports_failures(tmp_path, ar_checkpoint):
    """submitit's local executor: real subprocesses, one per point, two at a time."""
    not_a_model = tmp_path / "not_a_model"  # exists, so the sweep's checks pass; the point fails when it loads
    not_a_model.mkdir()
    path = write_sweep(tmp_path, ar_checkpoint, "tiny_slurm", grid={},
                       points=[{"attention.pattern": "block_clean"},
                               {"attention.pattern": "block", "model.name_or_path": str(not_a_model)}],
                       launcher="slurm", max_parallel=2, slurm={"cluster": "local", "timeout_min": 10},
                       eval={"enabled": False}, bench={"thresholds": [0.9]})
    result = run_sweep(path, echo=False)
    good = result.outcomes["pattern-block_clean"]
    (bad,) = [o for pid, o in result.outcomes.items() if pid != "pattern-block_clean"]
    assert good.status == "done", good.error
    assert bad.status == "failed" and "not_a_model" in bad.error
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(good.run_id)
    assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id and run.data.tags["dlm.status"] == "done"
    assert {"train/loss", "bench/dlm_batch1_t0.9/tpf"} <= set(run.data.metrics)
    assert client.get_run(result.parent_run_id).info.status == "FAILED"
    assert list((tmp_path / "out" / "tiny_slurm" / "submitit").glob("*_0_log.out"))  # submitit's job logs


class SecondSweepAt(L.Callback):
    """At `step` of the first process's training, runs the same sweep as a second `dlm sweep` process."""

    def __init__(self, sweep: Path, step: int = 2) -> None:
        self.sweep, self.step, self.second = sweep, step, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step and self.second is None:
            self.second = subprocess.run([sys.executable, "-m", "dlm.cli.main", "sweep", str(self.sweep)],
                                         capture_output=True, text=True, timeout=300,
                                         env=os.environ | {"PYTHONPATH": str(REPO)})


def test_a_second_sweep_process_on_the_same_sweep_refuses_in_one_line(tmp_path, ar_checkpoint):
    path = write_sweep(tmp_path, ar_checkpoint, "tiny_lock", grid={"attention.pattern": ["block"]},
                       eval={"enabled": False}, bench={"enabled": False})
    second = SecondSweepAt(path)
    result = run_sweep(path, callbacks=[second])
    assert second.second.returncode == 2, second.second.stderr[-2000:]
    errors = [line for line in second.second.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"is in use by pid {os.getpid()}" in errors[0], second.second.stderr[-2000:]
    assert "Traceback" not in second.second.stderr
    assert [o.status for o in result.outcomes.values()] == ["done"]  # the first one trained the point, once
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    child = _child(client, "pattern-block", "tiny_lock")
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 4  # every step logged once
    assert not (tmp_path / "out" / "tiny_lock" / ".dlm.lock").exists()


def test_a_rerun_repairs_a_point_whose_export_was_lost(tmp_path, ar_checkpoint):
    path = write_sweep(tmp_path, ar_checkpoint, "tiny_repair", grid={"attention.pattern": ["block"]},
                       eval={"enabled": False}, bench={"enabled": False})
    first = run_sweep(path)
    point_dir = tmp_path / "out" / "tiny_repair" / "pattern-block"
    run_id = first.outcomes["pattern-block"].run_id
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.set_tag(run_id, "dlm.status", "running")  # as a kill during the export leaves it
    (point_dir / "final").rename(point_dir / "final.partial")  # a half-written export, no final/
    again = run_sweep(path)
    assert again.outcomes["pattern-block"].status == "done" and again.outcomes["pattern-block"].run_id == run_id
    assert (point_dir / "final" / "dlm.yaml").is_file() and not (point_dir / "final.partial").exists()
