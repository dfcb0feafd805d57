"""A sweep's MLflow runs in a real sqlite store (one for the module): the parent created once and found again
by its tags, the children's `dlm.status` tags, and the dry run's look-up that never creates a store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from dlm.experiments.points import DONE, FAILED, RUNNING, expand
from dlm.experiments.sweep_runs import done_points_if_any, ensure_parent, find_parent, finished_points, set_status
from dlm.settings.sweep import SweepConfig, load_sweep
from dlm.tracking import runs

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments" / "tiny.yaml")
EXPERIMENT = "sweeps"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A sqlite MLflow store with the sweeps experiment (artifacts beside the file, as the library creates it);
    each test uses its own sweep names in it."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    runs.experiment_id(mlflow.MlflowClient(uri), EXPERIMENT, uri)
    return uri


def sweep_file(root: Path, name: str, grid: dict | None = None) -> SweepConfig:
    spec = {"name": name, "experiment": TINY, "output_dir": str(root / "out" / name),
            "grid": grid or {"attention.pattern": ["block", "block_clean"]}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_sweep(path)


def parent_of(store: str, tmp_path: Path, name: str) -> str:
    sweep = sweep_file(tmp_path, name)
    return ensure_parent(sweep, expand(sweep), store, EXPERIMENT)


def child(store: str, parent: str, point: str, status: str, start_time: int | None = None) -> str:
    """A point's child run as `dlm train` makes it under a sweep: tagged with its parent, point and status."""
    client = mlflow.MlflowClient(store)
    exp_id = client.get_run(parent).info.experiment_id
    tags = {"mlflow.parentRunId": parent, "dlm.point": point, "dlm.status": status, "dlm.role": "child"}
    return client.create_run(exp_id, start_time=start_time, tags=tags, run_name=point).info.run_id


# -- the parent -----------------------------------------------------------------------------------------------
def test_ensure_parent_creates_a_parent_tagged_with_what_was_swept_and_logs_sweep_yaml(store, tmp_path):
    sweep = sweep_file(tmp_path, "fresh")
    run_id = ensure_parent(sweep, expand(sweep), store, EXPERIMENT)
    client = mlflow.MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "fresh"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    tags = run.data.tags
    assert (tags["dlm.sweep"], tags["dlm.role"]) == ("fresh", "parent")
    assert json.loads(tags["dlm.swept"]) == ["attention.pattern"]
    assert json.loads(tags["dlm.points"]) == ["pattern-block", "pattern-block_clean"]
    assert tags["dlm.output_dir"] == str((tmp_path / "out" / "fresh").resolve())
    assert (tags["dlm.eval.tasks"], tags["dlm.eval.metric"]) == ("gsm8k_synthetic", "exact_match_strict-match")
    written = yaml.safe_load((tmp_path / "out" / "fresh" / "sweep.yaml").read_text())
    assert written["name"] == "fresh" and written["grid"] == {"attention.pattern": ["block", "block_clean"]}
    assert [a.path for a in client.list_artifacts(run_id)] == ["sweep.yaml"]
    assert run.info.artifact_uri.startswith(Path(store[len("sqlite:///"):]).parent.joinpath("mlruns").as_uri())


def test_ensure_parent_reuses_the_parent_found_by_its_tags_running_again_with_new_tags(store, tmp_path):
    first = parent_of(store, tmp_path, "rerun")
    client = mlflow.MlflowClient(store)
    client.set_terminated(first, "FAILED")
    sweep = sweep_file(tmp_path, "rerun", grid={"attention.pattern": ["block", "block_clean", "causal"]})
    again = ensure_parent(sweep, expand(sweep), store, EXPERIMENT)
    assert again == first
    run = client.get_run(again)
    assert run.info.status == "RUNNING"
    assert json.loads(run.data.tags["dlm.points"]) == ["pattern-block", "pattern-block_clean", "pattern-causal"]
    assert len(client.search_runs([run.info.experiment_id], "tags.`dlm.sweep` = 'rerun'")) == 1


def test_find_parent_returns_the_newest_parent_of_the_sweep(store):
    client = mlflow.MlflowClient(store)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    tags = {"dlm.sweep": "twice", "dlm.role": "parent"}
    old = client.create_run(exp_id, start_time=1_000, tags=tags).info.run_id
    new = client.create_run(exp_id, start_time=2_000, tags=tags).info.run_id
    client.create_run(exp_id, start_time=3_000, tags={"dlm.sweep": "twice", "dlm.role": "child"})
    assert old != new
    assert find_parent(client, "twice").info.run_id == new
    assert find_parent(client, "twice", [exp_id]).info.run_id == new


def test_find_parent_of_an_unknown_sweep_or_another_experiment_is_none(store, tmp_path):
    parent_of(store, tmp_path, "elsewhere")
    client = mlflow.MlflowClient(store)
    other = runs.experiment_id(client, "other", store)
    assert find_parent(client, "no_such_sweep") is None
    assert find_parent(client, "elsewhere", [other]) is None


# -- the children ---------------------------------------------------------------------------------------------
def test_finished_points_lists_only_the_children_marked_done(store, tmp_path):
    parent = parent_of(store, tmp_path, "children")
    done = child(store, parent, "pattern-block", DONE)
    child(store, parent, "pattern-block_clean", RUNNING)
    child(store, parent, "pattern-causal", FAILED)
    other_parent = parent_of(store, tmp_path, "other_children")
    child(store, other_parent, "pattern-bidirectional", DONE)
    assert finished_points(store, parent) == {"pattern-block": done}


def test_set_status_tags_the_child_and_terminates_it_when_asked(store, tmp_path):
    parent = parent_of(store, tmp_path, "status")
    run_id = child(store, parent, "pattern-block", RUNNING)
    client = mlflow.MlflowClient(store)
    set_status(store, run_id, FAILED, error="RuntimeError: " + "x" * 6000, terminate="FAILED")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["dlm.status"] == FAILED
    assert run.data.tags["dlm.error"] == ("RuntimeError: " + "x" * 6000)[:5000]


def test_set_status_without_terminate_keeps_the_run_open(store, tmp_path):
    parent = parent_of(store, tmp_path, "open")
    run_id = child(store, parent, "pattern-block", FAILED)
    set_status(store, run_id, RUNNING)
    run = mlflow.MlflowClient(store).get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["dlm.status"] == RUNNING
    assert "dlm.error" not in run.data.tags
    set_status(store, run_id, DONE, terminate="FINISHED")
    assert finished_points(store, parent) == {"pattern-block": run_id}


# -- dry runs -------------------------------------------------------------------------------------------------
def test_done_points_if_any_reads_the_newest_parent(store, tmp_path):
    parent = parent_of(store, tmp_path, "dry")
    done = child(store, parent, "pattern-block_clean", DONE)
    child(store, parent, "pattern-block", RUNNING)
    assert done_points_if_any("dry", store) == {"pattern-block_clean": done}
    assert done_points_if_any("never_ran", store) == {}


def test_done_points_if_any_does_not_create_a_missing_sqlite_store(tmp_path):
    db = tmp_path / "not_yet" / "mlflow.db"
    assert done_points_if_any("dry", f"sqlite:///{db}") == {}
    assert not db.exists() and not db.parent.exists()
