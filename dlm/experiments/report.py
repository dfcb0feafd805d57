"""`dlm report SWEEP_NAME`: one table row per sweep point and the ablation figures, read back from
MLflow.

The runs are found by tags alone (`dlm.sweep=<name>`, `dlm.role=parent`, then the parent's
children), so a report needs only the sweep's name and tracking URI, works for a sweep still running
(unfinished points show their status), and reads the same data the notebook
(`notebooks/ablations.ipynb`) does. The tidy frames below take the layout of `mlflow.search_runs`
(columns `run_id`, `metrics.<key>`, `params.<key>`, `tags.<key>`), so the notebook calls
`mlflow.search_runs` itself and passes its frame in.

Metric names read (written by `dlm.sweep`, `dlm.bench`, `dlm.evaluate`, `WeightDriftCallback`):
`val/loss`; `eval/[decode_block_<N>/]<task>/<metric>`;
`bench/<method>_batch<B>[_t<threshold>]/<key>`; `drift/layer_<i>/<attention|mlp>`. MLflow keeps
each metric's latest value, which is the final one here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dlm.experiments import sweep_plots
from dlm.experiments.points import short_names
from dlm.experiments.sweep_runs import find_parent
from dlm.settings import ConfigError
from dlm.settings.sweep import ReportConfig
from dlm.tracking import runs as tracking

if TYPE_CHECKING:
    import pandas as pd

DESCRIBE = {"pattern": "attention.pattern", "block_size": "attention.block_size",
            "shift": "objective.shift", "strategy": "masking.strategy",
            "half_life": "masking.half_life", "lr": "optim.lr",
            "clean_context": "attention.clean_context", "ar_weight": "objective.ar_weight"}
"""Columns every points frame carries (plot axes and labels), whatever was swept."""
EVAL_RE = re.compile(r"^metrics\.eval/(?:decode_block_(?P<bs>\d+)/)?"
                     r"(?P<task>[^/]+)/(?P<metric>[^/]+)$")
BENCH_RE = re.compile(r"^metrics\.bench/(?P<method>[^_/]+)_batch(?P<bs>\d+)"
                      r"(?:_t(?P<t>[^/]+))?/(?P<key>[^/]+)$")
DRIFT_RE = re.compile(r"^metrics\.drift/layer_(?P<layer>\d+)/(?P<group>attention|mlp)$")
PLOTS = ("accuracy_vs_block_size.png", "accuracy_vs_tpf.png", "drift_per_layer.png",
         "speculative.png")


@dataclass
class SweepRuns:
    """The parent run and its children in `mlflow.search_runs` layout (one row per child run)."""

    name: str
    parent: Any  # mlflow.entities.Run
    runs: pd.DataFrame

    @property
    def swept(self) -> list[str]:
        return json.loads(self.parent.data.tags.get("dlm.swept", "[]"))

    @property
    def metric(self) -> str:
        return self.parent.data.tags.get("dlm.eval.metric", "exact_match_strict-match")

    @property
    def task(self) -> str | None:
        tasks = self.parent.data.tags.get("dlm.eval.tasks", "")
        return tasks.split(",")[0] if tasks else None


def load_sweep_runs(sweep_name: str, tracking_uri: str | None = None) -> SweepRuns:
    """Parent (newest with the sweep's tags, in any experiment) and every child run of it."""
    uri = tracking.resolve_uri(tracking_uri)
    # do not create an empty store just to report nothing
    if not tracking.store_exists(uri):
        raise ConfigError(f"sweep={sweep_name!r}: no parent run; "
                          f"tracking URI {uri} has no store yet")
    client = tracking.client(uri)
    parent = find_parent(client, sweep_name)
    if parent is None:
        raise ConfigError(f"sweep={sweep_name!r}: no parent run in tracking URI {uri}; "
                          "run `dlm sweep` first")
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return SweepRuns(sweep_name, parent, runs_frame(children))


def runs_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """MLflow Run objects -> the frame `mlflow.search_runs` returns (without setting a global
    tracking URI)."""
    import pandas as pd

    rows = [{"run_id": r.info.run_id, "status": r.info.status, "start_time": r.info.start_time,
             **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
             **{f"params.{k}": v for k, v in r.data.params.items()},
             **{f"tags.{k}": v for k, v in r.data.tags.items()}} for r in runs]
    return pd.DataFrame(rows)


def parse_param(text: Any) -> Any:
    """MLflow stores params as strings; give back numbers and booleans for axes and sorting."""
    if not isinstance(text, str):
        return text
    if text in ("True", "true", "False", "false"):
        return text.lower() == "true"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- tidy frames -----------------------------------------------------------------------------------
def latest_per_point(runs: pd.DataFrame) -> pd.DataFrame:
    """One child per point: its `done` run if any (a re-run can leave an abandoned one), else the
    newest."""
    if runs.empty:
        return runs
    done = (_column(runs, "tags.dlm.status") == "done").astype(int)
    ordered = runs.assign(_done=done).sort_values(["_done", "start_time"], ascending=False)
    keep = ordered.drop_duplicates("tags.dlm.point").drop(columns="_done")
    has_index = "tags.dlm.point_index" in keep
    index = keep["tags.dlm.point_index"].astype(int) if has_index else range(len(keep))
    return keep.assign(_i=list(index)).sort_values("_i").drop(columns="_i").reset_index(drop=True)


def points_frame(runs: pd.DataFrame, swept: Sequence[str] = ()) -> pd.DataFrame:
    """point, the swept values (short names), the DESCRIBE columns, status, val_loss, run_id."""
    import pandas as pd

    runs = latest_per_point(runs)
    names = short_names(list(swept))
    out = pd.DataFrame({"point": runs["tags.dlm.point"]})
    for key in [*swept, *(k for k in DESCRIBE.values() if k not in swept)]:
        col = names.get(key) or next(n for n, k in DESCRIBE.items() if k == key)
        out[col] = _column(runs, f"params.{key}").map(parse_param)
    out["status"] = _column(runs, "tags.dlm.status").fillna(runs["status"])
    out["val_loss"] = _column(runs, "metrics.val/loss").astype(float)
    out["run_id"] = runs["run_id"]
    return out


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-None where no run logged it (MLflow leaves out keys nobody has)."""
    import pandas as pd

    if name in runs:
        return runs[name]
    return pd.Series([None] * len(runs), index=runs.index, dtype=object)


def eval_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Long: point, decode_block_size (the training block size when not swept), task, metric,
    value."""
    import pandas as pd

    runs = latest_per_point(runs)
    rows = []
    for _, run in runs.iterrows():
        train_bs = parse_param(run.get("params.attention.block_size"))
        for col, value in run.items():
            m = EVAL_RE.match(str(col))
            if m and pd.notna(value):
                bs = int(m["bs"]) if m["bs"] else train_bs
                rows.append({"point": run["tags.dlm.point"], "decode_block_size": bs,
                             "task": m["task"], "metric": m["metric"], "value": float(value)})
    return pd.DataFrame(rows, columns=["point", "decode_block_size", "task", "metric", "value"])


def bench_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Long: point, method, batch_size, threshold, then one column per bench key (tpf, exact_match,
    ...)."""
    import pandas as pd

    runs = latest_per_point(runs)
    cells: dict[tuple, dict[str, float]] = {}
    for _, run in runs.iterrows():
        for col, value in run.items():
            m = BENCH_RE.match(str(col))
            if m and pd.notna(value):
                threshold = float(m["t"]) if m["t"] else None
                key = (run["tags.dlm.point"], m["method"], int(m["bs"]), threshold)
                cells.setdefault(key, {})[m["key"]] = float(value)
    rows = [dict(zip(("point", "method", "batch_size", "threshold"), k), **v)
            for k, v in cells.items()]
    return pd.DataFrame(rows, columns=["point", "method", "batch_size", "threshold", "tpf",
                                       "exact_match", "tokens_per_sec", "nfe", "speedup_vs_ar",
                                       "speedup_cache", "same_as_ar_mode"])


def drift_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Long: point, layer, group (attention | mlp), drift (end of training)."""
    import pandas as pd

    runs = latest_per_point(runs)
    rows = []
    for _, run in runs.iterrows():
        for col, value in run.items():
            m = DRIFT_RE.match(str(col))
            if m and pd.notna(value):
                rows.append({"point": run["tags.dlm.point"], "layer": int(m["layer"]),
                             "group": m["group"], "drift": float(value)})
    return pd.DataFrame(rows, columns=["point", "layer", "group", "drift"])


def summary_table(points: pd.DataFrame, evals: pd.DataFrame, bench: pd.DataFrame, *,
                  swept: Sequence[str], metric: str, threshold: float = 0.9) -> pd.DataFrame:
    """Per point: the swept values (`swept`: column names), status, val loss, `metric` per task (and
    per decode block size when several), and TPF and tokens/s of the cached decoder at the smallest
    bench batch size and the bench threshold nearest `threshold`."""
    table = points[["point", *swept, "status", "val_loss"]].copy()
    scores = evals[evals["metric"] == metric]
    several = not scores.empty and scores.groupby("point")["decode_block_size"].nunique().max() > 1
    for (task, bs), group in scores.groupby(["task", "decode_block_size"]):
        column = f"{task}@bs{bs}" if several else task
        table[column] = table["point"].map(dict(zip(group["point"], group["value"])))
    cached = bench[bench["method"] == "dlm"] if "method" in bench else bench
    if not cached.empty:
        cached = cached[cached["batch_size"] == cached["batch_size"].min()]
        nearest = min(cached["threshold"].unique(), key=lambda t: abs(t - threshold))
        row = cached[cached["threshold"] == nearest].set_index("point")
        table[f"tpf@{nearest:g}"] = table["point"].map(row["tpf"])
        table[f"tok/s@{nearest:g}"] = table["point"].map(row["tokens_per_sec"])
        joint = any(m in set(bench["method"]) for m in SPEC_COLUMNS)
        if joint and row["exact_match"].notna().any():
            table[f"em@{nearest:g}"] = table["point"].map(row["exact_match"])
    return _speculative_columns(table, bench)


SPEC_COLUMNS = {"ar-self": {"exact_match": "ar_mode_em"},
                "spec": {"tpf": "spec_tpf", "speedup_vs_ar": "spec_x_ar",
                         "same_as_ar_mode": "spec_same"},
                "spec-sep": {"tpf": "spec_sep_tpf", "speedup_vs_ar": "spec_sep_x_ar"},
                "spec-br": {"tpf": "spec_br_tpf", "speedup_vs_ar": "spec_br_x_ar"}}
"""Joint-objective sweeps: the dLM's own AR mode and self-speculative decoding, per point (smallest
batch)."""


def _speculative_columns(table: pd.DataFrame, bench: pd.DataFrame) -> pd.DataFrame:
    for method, columns in SPEC_COLUMNS.items():
        rows = bench[bench["method"] == method]
        if rows.empty:
            continue
        rows = rows[rows["batch_size"] == rows["batch_size"].min()].set_index("point")
        for key, name in columns.items():
            if rows[key].notna().any():
                table[name] = table["point"].map(rows[key])
    return table


# -- the report ------------------------------------------------------------------------------------
@dataclass
class ReportResult:
    table: pd.DataFrame
    text: str
    out_dir: Path
    plots: list[Path] = field(default_factory=list)
    parent_run_id: str = ""


def report(sweep_name: str, settings: ReportConfig | None = None, *,
           echo: bool = True) -> ReportResult:
    """Print the sweep's table, write it (`summary.csv`, `summary.txt`) and the PNGs to
    `settings.out_dir` (default `<sweep output>/report`), and log them to the parent run under
    `report/`."""
    s = settings or ReportConfig()
    data = load_sweep_runs(sweep_name, s.tracking_uri)
    if data.runs.empty:
        raise ConfigError(f"sweep={sweep_name!r}: the parent run has no child runs yet")
    points = points_frame(data.runs, data.swept)
    evals, bench, drift = eval_frame(data.runs), bench_frame(data.runs), drift_frame(data.runs)
    swept = list(short_names(data.swept).values())
    table = summary_table(points, evals, bench, swept=swept, metric=data.metric,
                          threshold=s.threshold)
    text = format_summary(sweep_name, table, data.metric)
    sweep_dir = data.parent.data.tags.get("dlm.output_dir", f"outputs/sweeps/{sweep_name}")
    out = Path(s.out_dir or Path(sweep_dir) / "report")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    (out / "summary.txt").write_text(text + "\n")
    task = data.task or (evals["task"].iloc[0] if not evals.empty else "")
    figures = {
        PLOTS[0]: sweep_plots.accuracy_vs_block_size(points, evals, task=task, metric=data.metric),
        PLOTS[1]: sweep_plots.accuracy_vs_tpf(points, bench),
        PLOTS[2]: sweep_plots.drift_per_layer(drift),
        PLOTS[3]: sweep_plots.speculative(points, bench),
    }
    plots = [sweep_plots.save(fig, out / name) for name, fig in figures.items() if fig is not None]
    tracking.log_artifacts(data.parent.info.run_id, s.tracking_uri,
                           [out / "summary.csv", out / "summary.txt", *plots], "report")
    if echo:
        print(text)
        print(f"report: {out} (plots: {', '.join(p.name for p in plots) or 'none'}); "
              f"parent run {data.parent.info.run_id}")
    return ReportResult(table, text, out, plots, data.parent.info.run_id)


def format_summary(sweep_name: str, table: pd.DataFrame, metric: str) -> str:
    body = table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–")
    return f"sweep {sweep_name}: {len(table)} points; accuracy = {metric}\n{body}"
