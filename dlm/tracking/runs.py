"""MLflow in one place: the default local store, the run file `dlm train` leaves beside its export,
run lookup with one-line errors, and batched logging of metrics and artifacts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dlm.settings.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""Local MLflow store in the working directory
(`mlflow ui --backend-store-uri sqlite:///mlflow.db`)."""
RUN_ID_FILE = "mlflow_run.json"
"""`{run_id, tracking_uri}` of the run that trained `<output_dir>`, written by `dlm train`."""


def resolve_uri(tracking_uri: str | None) -> str:
    return tracking_uri or DEFAULT_TRACKING_URI


def client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(resolve_uri(tracking_uri))


def store_exists(tracking_uri: str) -> bool:
    """False for a sqlite file not yet created (a dry run must not create the store)."""
    prefix = "sqlite:///"
    return not tracking_uri.startswith(prefix) or Path(tracking_uri[len(prefix):]).is_file()


def check_run(run_id: str, tracking_uri: str | None, *, key: str = "mlflow_run") -> None:
    """Fail in one line, before any work, when the run to log into does not exist."""
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(tracking_uri)
    if not store_exists(uri):  # asking a missing sqlite file would create it
        raise ConfigError(f"{key}={run_id!r}: no such run; tracking URI {uri} has no store yet")
    try:
        client(uri).get_run(run_id)
    except MlflowException:
        raise ConfigError(f"{key}={run_id!r}: no such run in tracking URI {uri}") from None


def experiment_id(mlflow_client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, created if new; a sqlite store keeps artifacts in `mlruns/` beside its
    file (not in the working directory, MLflow's default)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def write_run_file(out_dir: str | Path, run_id: str, tracking_uri: str) -> Path:
    path = Path(out_dir) / RUN_ID_FILE
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    return path


def read_run_file(out_dir: str | Path) -> dict[str, str] | None:
    path = Path(out_dir) / RUN_ID_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_run(run: str | None, tracking_uri: str | None, *,
                checkpoint: str | Path | None = None,
                key: str = "mlflow_run") -> tuple[str, str] | None:
    """(run id, tracking URI), checked to exist; None when no run is asked for. `auto`: the run that
    trained `checkpoint`, read from the run file beside it (`<output_dir>/final` ->
    `<output_dir>/mlflow_run.json`)."""
    if run is None:
        return None
    if run == "auto":
        saved = read_run_file(Path(checkpoint).resolve().parent) if checkpoint is not None else None
        if saved is None:
            raise ConfigError(f"{key}='auto': no {RUN_ID_FILE} beside "
                              f"checkpoint={str(checkpoint)!r}; pass a run id")
        run, tracking_uri = saved["run_id"], tracking_uri or saved["tracking_uri"]
    check_run(run, tracking_uri, key=key)
    return run, resolve_uri(tracking_uri)


def log_metrics(run_id: str, tracking_uri: str | None, metrics: dict[str, float], *, step: int = 0,
                params: dict[str, Any] | None = None) -> None:
    """One batch of metrics (and params) at `step`."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    batch_metrics = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    batch_params = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    client(tracking_uri).log_batch(run_id, metrics=batch_metrics, params=batch_params)


def log_artifacts(run_id: str, tracking_uri: str | None, paths: Sequence[str | Path],
                  artifact_path: str | None = None) -> None:
    mlflow_client = client(tracking_uri)
    for path in paths:
        mlflow_client.log_artifact(run_id, str(path), artifact_path)


def new_run(tracking_uri: str | None, experiment: str, run_name: str | None = None) -> str:
    """A fresh run in `experiment` (created if new); its id."""
    uri = resolve_uri(tracking_uri)
    mlflow_client = client(uri)
    exp_id = experiment_id(mlflow_client, experiment, uri)
    return mlflow_client.create_run(exp_id, run_name=run_name).info.run_id
