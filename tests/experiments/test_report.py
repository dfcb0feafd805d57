"""`dlm report`: tidy frames from MLflow's run layout, the summary table, PNGs and parent-run artifacts."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from dlm.experiments.report import (
    bench_frame,
    drift_frame,
    eval_frame,
    latest_per_point,
    points_frame,
    report,
    summary_table,
)
from dlm.settings import ConfigError
from dlm.settings.sweep import ReportConfig
from tests.experiments.test_sweep import POINTS, SWEEP_NAME, tiny_sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return tiny_sweep(tmp_path_factory.getbasetemp() / "tiny_sweep")


def _run(point: str, index: int, start: int, status: str = "done", **cols) -> dict:
    return {"run_id": f"r{point}{start}", "status": "FINISHED", "start_time": start, "tags.dlm.point": point,
            "tags.dlm.point_index": str(index), "tags.dlm.status": status, "params.attention.pattern": "block_clean",
            "params.attention.block_size": "4", "params.masking.strategy": "position",
            "params.masking.half_life": "0.1", "params.objective.shift": "False", **cols}


def mlflow_runs() -> pd.DataFrame:
    """Two points in `mlflow.search_runs` layout; point a also has an abandoned older run."""
    return pd.DataFrame([
        _run("a", 0, 1, status="failed", **{"metrics.val/loss": 9.0}),
        _run("a", 0, 2, **{"metrics.val/loss": 1.5, "metrics.eval/decode_block_4/gsm8k/exact_match_strict-match": 0.25,
                            "metrics.eval/decode_block_8/gsm8k/exact_match_strict-match": 0.125,
                            "metrics.bench/dlm_batch1_t0.9/tpf": 2.0, "metrics.bench/dlm_batch1_t0.9/exact_match": 0.5,
                            "metrics.bench/dlm_batch1_t0.9/tokens_per_sec": 40.0, "metrics.bench/ar_batch1/tpf": 1.0,
                            "metrics.drift/layer_00/attention": 0.01, "metrics.drift/layer_01/mlp": 0.02}),
        _run("b", 1, 3, **{"params.attention.block_size": "8", "metrics.val/loss": 1.25,
                            "metrics.eval/decode_block_4/gsm8k/exact_match_strict-match": 0.5,
                            "metrics.bench/dlm_batch1_t0.5/tpf": 3.0, "metrics.bench/dlm_batch1_t0.5/exact_match": 0.25,
                            "metrics.bench/dlm_batch1_t0.5/tokens_per_sec": 60.0}),
    ])


@pytest.fixture
def runs() -> pd.DataFrame:
    return mlflow_runs()


def test_latest_per_point_keeps_the_done_run_in_sweep_order(runs):
    kept = latest_per_point(runs.iloc[::-1])
    assert list(kept["run_id"]) == ["ra2", "rb3"]


def test_frames_parse_metric_names_and_params(runs):
    points = points_frame(runs, ["attention.block_size"])
    assert list(points["block_size"]) == [4, 8] and list(points["val_loss"]) == [1.5, 1.25]
    assert points["shift"].tolist() == [False, False] and points["half_life"].tolist() == [0.1, 0.1]
    evals = eval_frame(runs)
    assert sorted(zip(evals["point"], evals["decode_block_size"], evals["value"])) == [
        ("a", 4, 0.25), ("a", 8, 0.125), ("b", 4, 0.5)]
    bench = bench_frame(runs).set_index(["point", "method", "threshold"], drop=False)
    assert bench.loc[("a", "dlm", 0.9), "tpf"] == 2.0 and bench.loc[("b", "dlm", 0.5), "tokens_per_sec"] == 60.0
    ar = bench[bench["method"] == "ar"]
    assert ar["threshold"].isna().all() and ar["tpf"].tolist() == [1.0]
    drift = drift_frame(runs)
    assert list(zip(drift["layer"], drift["group"], drift["drift"])) == [(0, "attention", 0.01), (1, "mlp", 0.02)]


def test_summary_table_has_a_column_per_decode_block_size_and_the_nearest_threshold(runs):
    points = points_frame(runs, ["attention.block_size"])
    table = summary_table(points, eval_frame(runs), bench_frame(runs), swept=["block_size"],
                          metric="exact_match_strict-match", threshold=0.8)
    assert list(table.columns) == ["point", "block_size", "status", "val_loss", "gsm8k@bs4", "gsm8k@bs8",
                                   "tpf@0.9", "tok/s@0.9"]
    assert table["gsm8k@bs8"].tolist()[0] == 0.125 and pd.isna(table["gsm8k@bs8"].tolist()[1])
    assert table["tpf@0.9"].tolist()[0] == 2.0


def test_report_prints_the_table_writes_pngs_and_logs_them_to_the_parent(swept, tmp_path, capsys):
    result = report(SWEEP_NAME, ReportConfig(tracking_uri=swept.tracking_uri, out_dir=str(tmp_path)))
    out = capsys.readouterr().out
    assert out.startswith(f"sweep {SWEEP_NAME}: 2 points; accuracy = exact_match_strict-match\n")
    assert list(result.table.columns) == ["point", "pattern", "status", "val_loss", "gsm8k_synthetic", "tpf@0.9",
                                          "tok/s@0.9"]
    assert result.table["point"].tolist() == POINTS and result.table["status"].tolist() == ["done", "done"]
    assert result.table["val_loss"].gt(0).all() and result.table["tpf@0.9"].ge(1).all()
    assert [p.name for p in result.plots] == ["accuracy_vs_block_size.png", "accuracy_vs_tpf.png",
                                              "drift_per_layer.png"]
    assert all(p.read_bytes().startswith(PNG) for p in result.plots)
    assert pd.read_csv(tmp_path / "summary.csv")["point"].tolist() == POINTS
    artifacts = {a.path for a in mlflow.MlflowClient(swept.tracking_uri).list_artifacts(result.parent_run_id, "report")}
    assert artifacts == {f"report/{name}" for name in ["summary.csv", "summary.txt", *(p.name for p in result.plots)]}


def test_report_of_an_unknown_sweep_fails_in_one_line(swept):
    with pytest.raises(ConfigError, match=r"^sweep='nope': no parent run in tracking URI sqlite:///.*; "
                                          r"run `dlm sweep` first$"):
        report("nope", ReportConfig(tracking_uri=swept.tracking_uri))


def test_summary_table_of_a_joint_objective_sweep_shows_ar_mode_and_speculative_columns():
    spec = {"metrics.bench/dlm_batch1_t0.9/tpf": 3.0, "metrics.bench/dlm_batch1_t0.9/exact_match": 0.9,
            "metrics.bench/dlm_batch1_t0.9/tokens_per_sec": 50.0, "metrics.bench/ar-self_batch1/exact_match": 0.95}
    runs = pd.DataFrame([
        _run("block", 0, 1, **{"params.attention.clean_context": "block", "params.objective.ar_weight": "0.0"}, **spec),
        _run("joint", 1, 2, **{"params.attention.clean_context": "causal", "params.objective.ar_weight": "1.0",
                               "metrics.bench/spec_batch1/tpf": 2.75, "metrics.bench/spec_batch1/speedup_vs_ar": 2.5,
                               "metrics.bench/spec_batch1/same_as_ar_mode": 1.0,
                               "metrics.bench/spec-sep_batch1/tpf": 1.5, "metrics.bench/spec_batch4/tpf": 9.0}, **spec),
    ])
    points = points_frame(runs, ["objective.ar_weight"])
    assert points["clean_context"].tolist() == ["block", "causal"]
    table = summary_table(points, eval_frame(runs), bench_frame(runs), swept=["ar_weight"], metric="m")
    assert list(table.columns) == ["point", "ar_weight", "status", "val_loss", "tpf@0.9", "tok/s@0.9", "em@0.9",
                                   "ar_mode_em", "spec_tpf", "spec_x_ar", "spec_same", "spec_sep_tpf"]
    assert table["spec_tpf"].tolist()[1] == 2.75 and pd.isna(table["spec_tpf"].tolist()[0])
    assert table["ar_mode_em"].tolist() == [0.95, 0.95] and table["spec_same"].tolist()[1] == 1.0
