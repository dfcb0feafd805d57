"""A sweep's points: the grid expanded with readable ids, and every point's experiment config built
and checked (with its data source, base checkpoint and eval tasks) before any run exists."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence

from dlm.settings import ConfigError, ExperimentConfig, TrackingConfig, check
from dlm.settings.sweep import POINT_ID, SweepConfig
from dlm.tensor.patterns import load_experiment
from dlm.tracking.runs import DEFAULT_TRACKING_URI

RUNNING, DONE, FAILED = "running", "done", "failed"
"""Values of a child's `dlm.status` tag: only `done` means finished (a killed run keeps
`running`)."""


@dataclass(frozen=True)
class Point:
    id: str
    values: Dict[str, Any]  # swept key -> value
    index: int

    @property
    def overrides(self) -> list[str]:
        # json gives omegaconf's dotlist grammar: quoted strings stay strings ("0.1" is not 0.1)
        return [f"{k}={json.dumps(v)}" for k, v in self.values.items()]


def expand(sweep: SweepConfig) -> list[Point]:
    """The grid's Cartesian product, then the explicit points; ids are slugs of the swept values."""
    combos = ([dict(zip(sweep.grid, v)) for v in itertools.product(*sweep.grid.values())]
              if sweep.grid else [])
    explicit = [{k: v for k, v in p.items() if k != "id"} for p in sweep.points]
    names = short_names([*sweep.grid, *(k for p in explicit for k in p)])
    ids = [None] * len(combos) + [p.get("id") for p in sweep.points]
    points, seen = [], {}
    for i, (values, given) in enumerate(zip([*combos, *explicit], ids)):
        pid = str(given) if given is not None else point_id(values, names)
        check(bool(POINT_ID.match(pid)), f"points[{i - len(combos)}].id", pid,
              "letters, digits and . _ + - only")
        check(pid not in seen, "points", pid,
              f"two points have this id (#{seen.get(pid)} and #{i}); give them an explicit id")
        seen[pid] = i
        points.append(Point(pid, values, i))
    return points


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Key -> its last component, or the whole key (dots as '-') where two swept keys share one."""
    keys = list(dict.fromkeys(keys))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (tail if last.count(tail) == 1 else k.replace(".", "-"))
            for k, tail in zip(keys, last)}


def point_id(values: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """`{attention.pattern: block_clean, objective.shift: true}` ->
    `pattern-block_clean_shift-true`."""
    names = names or short_names(list(values))
    return "_".join(f"{names[k]}-{slug(v)}" for k, v in values.items()) or "base"


def slug(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(slug(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


# -- point configs ---------------------------------------------------------------------------------
def point_config(sweep: SweepConfig, point: Point,
                 parent_run_id: str | None = None) -> ExperimentConfig:
    """The point's full experiment config, with the sweep's name, output folder, resume and
    tracking."""
    try:
        cfg = load_experiment(sweep.experiment, overrides=[*sweep.overrides, *point.overrides])
    except ConfigError as err:
        raise ConfigError(f"sweep point {point.id!r}: {err}") from None
    tags = {"dlm.sweep": sweep.name, "dlm.point": point.id, "dlm.point_index": str(point.index),
            "dlm.role": "child", "dlm.status": RUNNING}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    cfg.name = f"{sweep.name}-{point.id}"
    cfg.output_dir = str(Path(sweep.output_dir) / point.id)
    cfg.resume = True
    tracking_uri = sweep.tracking.uri or cfg.tracking.tracking_uri or DEFAULT_TRACKING_URI
    cfg.tracking = TrackingConfig(tracking_uri=tracking_uri,
                                  experiment=sweep.tracking.experiment or cfg.tracking.experiment,
                                  run_name=point.id, tags=tags)
    return cfg


def validate_sweep(sweep: SweepConfig) -> dict[str, ExperimentConfig]:
    """Every point's config, base checkpoint and data path, and the eval tasks, checked before
    anything runs; point id -> config."""
    from dlm.data.sources import check_source
    from dlm.training.preflight import check_trainer

    # point ids: readable and unique
    configs = {p.id: point_config(sweep, p) for p in expand(sweep)}
    for pid, cfg in configs.items():
        _check_base_checkpoint(pid, cfg.model.name_or_path)
        try:
            check_source(cfg.data)
            check_trainer(cfg)  # accelerator and strategy, as Lightning knows them
        except ConfigError as err:
            raise ConfigError(f"sweep point {pid!r}: {err}") from None
    if sweep.eval.enabled:
        from dlm.evaluation.tasks import prepare_tasks

        prepare_tasks(sweep.eval.tasks)  # unknown task names fail here, in one line
    return configs


def _check_base_checkpoint(pid: str, path: str | None) -> None:
    """A local base model (an HF folder or a .gguf file) that is missing fails now, not after the
    first points have trained; a hub id is the loader's to resolve."""
    from dlm.models.checkpoint import is_plain_model

    if path is None or Path(path).expanduser().is_dir() or is_plain_model(path):
        return
    raise ConfigError(f"sweep point {pid!r}: model.name_or_path={path!r}: "
                      "no such folder or .gguf file; train the AR model first "
                      "(for the tiny sweeps: dlm train experiments/tiny_ar.yaml)")
