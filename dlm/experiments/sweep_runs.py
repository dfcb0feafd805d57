"""A sweep's MLflow runs: one parent (found again by its tags on a re-run) and a child per point,
whose `dlm.status` tag says whether the point is done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from omegaconf import OmegaConf

from dlm.experiments.points import DONE, Point, short_names
from dlm.settings.sweep import SweepConfig
from dlm.tracking import runs

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run


def find_parent(client: MlflowClient, sweep_name: str,
                experiment_ids: Sequence[str] | None = None) -> Run | None:
    """The newest parent run of `sweep_name` (tags dlm.sweep + dlm.role=parent), or None."""
    ids = (list(experiment_ids) if experiment_ids
           else [e.experiment_id for e in client.search_experiments()])
    query = f"tags.`dlm.sweep` = '{sweep_name}' and tags.`dlm.role` = 'parent'"
    found = client.search_runs(ids, query, order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def ensure_parent(sweep: SweepConfig, points: Sequence[Point], uri: str, experiment: str) -> str:
    """The sweep's parent run (reused on a re-run, set RUNNING again); its tags tell `dlm report`
    what was swept."""
    client = runs.client(uri)
    exp_id = runs.experiment_id(client, experiment, uri)
    found = find_parent(client, sweep.name, [exp_id])
    swept = list(short_names([k for p in points for k in p.values]))
    tags = {"dlm.sweep": sweep.name, "dlm.role": "parent", "dlm.swept": json.dumps(swept),
            "dlm.points": json.dumps([p.id for p in points]),
            "dlm.output_dir": str(Path(sweep.output_dir).resolve()),
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
    client = runs.client(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                            f"and tags.`dlm.status` = '{DONE}'")
    return {r.data.tags["dlm.point"]: r.info.run_id for r in children}


def done_points_if_any(sweep_name: str, uri: str) -> dict[str, str]:
    """Finished points of the sweep's newest parent, without creating the store (dry runs)."""
    if not runs.store_exists(uri):
        return {}
    parent = find_parent(runs.client(uri), sweep_name)
    return finished_points(uri, parent.info.run_id) if parent else {}




def set_status(uri: str, run_id: str, status: str, *, error: str | None = None,
               terminate: str | None = None) -> None:
    """The child's `dlm.status` tag (and `dlm.error`), optionally ending the run FINISHED /
    FAILED."""
    client = runs.client(uri)
    client.set_tag(run_id, "dlm.status", status)
    if error is not None:
        client.set_tag(run_id, "dlm.error", error[:5000])
    if terminate is not None:
        client.set_terminated(run_id, terminate)
