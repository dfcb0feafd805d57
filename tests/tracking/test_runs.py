"""MLflow in one place, against a real sqlite store (one per module: creating it costs seconds): the default
URI, run lookup and its one-line errors, the run file beside an export, and batched logging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dlm.settings import ConfigError
from dlm.tracking.runs import (
    DEFAULT_TRACKING_URI,
    RUN_ID_FILE,
    check_run,
    experiment_id,
    log_artifacts,
    log_metrics,
    new_run,
    read_run_file,
    resolve_run,
    resolve_uri,
    store_exists,
    write_run_file,
)

MISSING_RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A sqlite store with one experiment and one run in it."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    mlflow_client = MlflowClient(uri)
    experiment = experiment_id(mlflow_client, "tests", uri)
    run = mlflow_client.create_run(experiment, run_name="first").info.run_id
    return {"folder": folder, "uri": uri, "client": mlflow_client, "experiment": experiment, "run": run}


# --- the URI and the store ----------------------------------------------------------------------------------------


def test_no_tracking_uri_means_the_local_sqlite_store():
    assert resolve_uri(None) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_uri("") == DEFAULT_TRACKING_URI
    assert resolve_uri("sqlite:////elsewhere/runs.db") == "sqlite:////elsewhere/runs.db"


def test_store_exists_once_the_sqlite_file_is_there(store, tmp_path):
    assert store_exists(store["uri"])
    absent = f"sqlite:///{tmp_path}/absent.db"
    assert not store_exists(absent)
    assert not (tmp_path / "absent.db").exists()  # asking does not create the store
    assert store_exists("http://localhost:5000")  # a server is not checked here


# --- check_run and experiment_id ----------------------------------------------------------------------------------


def test_an_existing_run_passes_the_check(store):
    assert check_run(store["run"], store["uri"]) is None


def test_a_missing_run_fails_in_one_line_naming_key_run_and_uri(store):
    match = rf"^mlflow_run='{MISSING_RUN}': no such run in tracking URI {store['uri']}$"
    with pytest.raises(ConfigError, match=match) as err:
        check_run(MISSING_RUN, store["uri"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^bench\.mlflow_run='nope': no such run in tracking URI sqlite:///"):
        check_run("nope", store["uri"], key="bench.mlflow_run")


def test_experiment_is_created_once_with_artifacts_beside_the_sqlite_file(store):
    assert experiment_id(store["client"], "tests", store["uri"]) == store["experiment"]
    again = experiment_id(store["client"], "created-here", store["uri"])
    assert experiment_id(store["client"], "created-here", store["uri"]) == again != store["experiment"]
    found = store["client"].search_experiments(filter_string="name = 'created-here'")
    assert [e.name for e in found] == ["created-here"]
    location = store["client"].get_experiment(again).artifact_location
    assert location == (Path(store["folder"]).resolve() / "mlruns").as_uri()


# --- the run file -------------------------------------------------------------------------------------------------


def test_run_file_round_trips_and_is_none_when_absent(tmp_path):
    path = write_run_file(tmp_path, "abc123", "sqlite:///x.db")
    assert path == tmp_path / RUN_ID_FILE == tmp_path / "mlflow_run.json"
    assert json.loads(path.read_text()) == {"run_id": "abc123", "tracking_uri": "sqlite:///x.db"}
    assert read_run_file(str(tmp_path)) == {"run_id": "abc123", "tracking_uri": "sqlite:///x.db"}
    assert read_run_file(tmp_path / "elsewhere") is None


# --- resolve_run ----------------------------------------------------------------------------------------------------


def test_no_run_asked_for_resolves_to_none(store):
    assert resolve_run(None, store["uri"]) is None


def test_an_explicit_run_id_is_checked_and_returned_with_its_uri(store):
    assert resolve_run(store["run"], store["uri"]) == (store["run"], store["uri"])
    with pytest.raises(ConfigError, match=rf"^eval\.mlflow_run='{MISSING_RUN}': no such run"):
        resolve_run(MISSING_RUN, store["uri"], key="eval.mlflow_run")


def test_auto_reads_the_run_file_beside_the_checkpoint_folder(store, tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "final").mkdir(parents=True)
    write_run_file(out_dir, store["run"], store["uri"])
    assert resolve_run("auto", None, checkpoint=out_dir / "final") == (store["run"], store["uri"])
    assert resolve_run("auto", store["uri"], checkpoint=str(out_dir / "final")) == (store["run"], store["uri"])


def test_auto_checks_the_run_the_file_names(store, tmp_path):
    (tmp_path / "final").mkdir()
    write_run_file(tmp_path, MISSING_RUN, store["uri"])
    with pytest.raises(ConfigError, match=rf"^mlflow_run='{MISSING_RUN}': no such run in tracking URI {store['uri']}$"):
        resolve_run("auto", None, checkpoint=tmp_path / "final")


def test_auto_without_a_run_file_fails_in_one_line(tmp_path):
    checkpoint = tmp_path / "out" / "final"
    checkpoint.mkdir(parents=True)
    write_run_file(checkpoint, "inside-not-beside", "sqlite:///x.db")  # inside the checkpoint is not beside it
    match = rf"^bench\.mlflow_run='auto': no mlflow_run\.json beside checkpoint='{checkpoint}'; pass a run id$"
    with pytest.raises(ConfigError, match=match) as err:
        resolve_run("auto", None, checkpoint=checkpoint, key="bench.mlflow_run")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^mlflow_run='auto': no mlflow_run\.json beside checkpoint='None'"):
        resolve_run("auto", None)


# --- logging and new runs -------------------------------------------------------------------------------------------


def test_logged_metrics_and_params_are_visible_through_the_client(store):
    run = new_run(store["uri"], "tests", run_name="metrics")
    log_metrics(run, store["uri"], {"bench/tpf": 2.5, "bench/tokens": 7}, step=3,
                params={"block_size": 4, "long": "x" * 7000})
    log_metrics(run, store["uri"], {"bench/tpf": 3.0}, step=4)
    data = store["client"].get_run(run).data
    assert data.metrics == {"bench/tpf": 3.0, "bench/tokens": 7.0}
    assert data.params == {"block_size": "4", "long": "x" * 6000}  # cut to MLflow's limit
    history = store["client"].get_metric_history(run, "bench/tpf")
    assert sorted((m.step, m.value) for m in history) == [(3, 2.5), (4, 3.0)]


def test_logged_artifacts_are_listed_under_their_path_and_stored_beside_the_sqlite_file(store, tmp_path):
    run = new_run(store["uri"], "tests", run_name="artifacts")
    files = [tmp_path / "bench.json", tmp_path / "pareto.png"]
    files[0].write_text("{}")
    files[1].write_bytes(b"\x89PNG")
    log_artifacts(run, store["uri"], files, "bench")
    log_artifacts(run, store["uri"], [str(files[0])])
    listed = {a.path for a in store["client"].list_artifacts(run, "bench")}
    assert listed == {"bench/bench.json", "bench/pareto.png"}
    assert "bench.json" in {a.path for a in store["client"].list_artifacts(run)}
    artifact_uri = store["client"].get_run(run).info.artifact_uri
    assert artifact_uri.startswith((Path(store["folder"]).resolve() / "mlruns").as_uri() + "/")
    stored = Path(artifact_uri.removeprefix("file://")) / "bench" / "pareto.png"
    assert stored.read_bytes() == b"\x89PNG"


def test_new_run_creates_its_experiment_once_and_names_the_run(store):
    first = new_run(store["uri"], "fresh", run_name="one")
    second = new_run(store["uri"], "fresh")
    runs = {r.info.run_id: r for r in store["client"].search_runs([store["client"].get_experiment_by_name("fresh")
                                                                   .experiment_id])}
    assert set(runs) == {first, second}
    assert runs[first].info.run_name == "one"
    assert runs[first].info.experiment_id == runs[second].info.experiment_id
    assert resolve_run(first, store["uri"]) == (first, store["uri"])


def test_asking_a_missing_store_for_a_run_fails_without_creating_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    with pytest.raises(ConfigError, match=r"^mlflow_run='r1': no such run; tracking URI .*absent.db has no store yet$"):
        check_run("r1", uri)
    assert not (tmp_path / "absent.db").exists()
