"""Sweep figures from the tidy frames of `dlm.experiments.report` (points, eval, bench, drift): which lines,
bars and labels each figure draws, and None when the sweep logged nothing to draw."""

from __future__ import annotations

import pandas as pd
import pytest

from dlm.experiments import sweep_plots
from dlm.experiments.report import bench_frame, drift_frame, eval_frame, points_frame
from tests.experiments.test_report import mlflow_runs

PNG = b"\x89PNG\r\n\x1a\n"
METRIC = "exact_match_strict-match"


@pytest.fixture
def runs() -> pd.DataFrame:
    return mlflow_runs()


def points_of(*rows: dict) -> pd.DataFrame:
    """A points frame (`report.points_frame` layout): every DESCRIBE column, the given values over defaults."""
    base = {"pattern": "block_clean", "shift": False, "block_size": 4, "strategy": "position", "half_life": 0.1,
            "lr": 1e-4, "status": "done", "val_loss": 1.0, "run_id": "r"}
    return pd.DataFrame([base | row for row in rows])


def evals_of(*rows: tuple[str, int, float], task: str = "gsm8k", metric: str = METRIC) -> pd.DataFrame:
    """(point, decode block size, value) rows in `report.eval_frame` layout."""
    return pd.DataFrame([{"point": p, "decode_block_size": bs, "task": task, "metric": metric, "value": v}
                         for p, bs, v in rows])


def bench_of(*rows: tuple) -> pd.DataFrame:
    """(point, method, batch size, threshold, tpf, exact match) rows in `report.bench_frame` layout."""
    return pd.DataFrame([dict(zip(("point", "method", "batch_size", "threshold", "tpf", "exact_match"), r))
                         for r in rows])


# -- accuracy vs block size -----------------------------------------------------------------------------------
def test_block_size_plot_draws_a_line_per_trained_point_over_decode_block_sizes(runs):
    points = points_frame(runs, ["attention.block_size"])
    fig = sweep_plots.accuracy_vs_block_size(points, eval_frame(runs), task="gsm8k", metric="exact_match_strict-match")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["train block 4", "train block 8"]
    assert list(ax.lines[0].get_xdata()) == [4, 8] and ax.get_xlabel() == "decode block size"


def test_block_size_plot_draws_a_line_per_pattern_over_the_training_block_size():
    points = points_of({"point": "b4", "pattern": "block", "block_size": 4},
                       {"point": "b8", "pattern": "block", "block_size": 8},
                       {"point": "c8", "pattern": "block_clean", "block_size": 8},
                       {"point": "c4", "pattern": "block_clean", "block_size": 4})
    evals = evals_of(("b4", 4, 0.2), ("b8", 8, 0.3), ("c8", 8, 0.5), ("c4", 4, 0.4))
    (ax,) = sweep_plots.accuracy_vs_block_size(points, evals, task="gsm8k", metric=METRIC).axes
    assert [line.get_label() for line in ax.lines] == ["block", "block_clean"]
    assert [list(line.get_xdata()) for line in ax.lines] == [[4, 8], [4, 8]]
    assert [list(line.get_ydata()) for line in ax.lines] == [[0.2, 0.3], [0.4, 0.5]]
    assert ax.get_xlabel() == "training block size" and ax.get_xscale() == "log"
    assert ax.get_ylabel() == f"gsm8k {METRIC}" and ax.get_title() == "Accuracy vs block size"


def test_block_size_plot_of_a_single_block_size_is_a_bar_per_point():
    points = points_of({"point": "block", "pattern": "block"}, {"point": "clean", "pattern": "block_clean"})
    evals = evals_of(("block", 4, 0.25), ("clean", 4, 0.5))
    (ax,) = sweep_plots.accuracy_vs_block_size(points, evals, task="gsm8k", metric=METRIC).axes
    assert [bar.get_height() for bar in ax.patches] == [0.25, 0.5] and not ax.lines
    assert [t.get_text() for t in ax.get_xticklabels()] == ["block", "block_clean"]
    assert ax.get_xlabel() == "block size 4" and ax.get_legend() is None


def test_block_size_plot_of_another_task_or_metric_is_none():
    points = points_of({"point": "a"})
    evals = evals_of(("a", 4, 0.25))
    assert sweep_plots.accuracy_vs_block_size(points, evals, task="mmlu", metric=METRIC) is None
    assert sweep_plots.accuracy_vs_block_size(points, evals, task="gsm8k", metric="acc") is None


# -- accuracy vs TPF ------------------------------------------------------------------------------------------
def test_tpf_plot_draws_a_line_per_point_at_the_smallest_batch_dashed_for_uniform_masking():
    points = points_of({"point": "pos", "strategy": "position", "half_life": 0.1},
                       {"point": "uni", "strategy": "uniform", "half_life": 1.0})
    bench = bench_of(("pos", "dlm", 1, 0.9, 1.5, 0.5), ("pos", "dlm", 1, 0.5, 3.0, 0.25),
                     ("uni", "dlm", 1, 0.9, 1.25, 0.4), ("pos", "dlm", 4, 0.9, 9.0, 0.1),
                     ("pos", "ar", 1, None, 1.0, 0.6))
    (ax,) = sweep_plots.accuracy_vs_tpf(points, bench).axes
    assert [line.get_label() for line in ax.lines] == ["position, λ=0.1", "uniform"]
    assert [line.get_linestyle() for line in ax.lines] == ["-", "--"]
    assert list(ax.lines[0].get_xdata()) == [1.5, 3.0] and list(ax.lines[0].get_ydata()) == [0.5, 0.25]
    assert [t.get_text() for t in ax.texts] == ["τ=0.9", "τ=0.5", "τ=0.9"]
    assert ax.get_title() == "Accuracy vs TPF, cached decoder, batch 1"


def test_tpf_plot_without_exact_match_is_none():
    points = points_of({"point": "a"})
    assert sweep_plots.accuracy_vs_tpf(points, bench_of(("a", "dlm", 1, 0.9, 2.0, None))) is None
    assert sweep_plots.accuracy_vs_tpf(points, bench_of(("a", "ar", 1, None, 1.0, 0.5))) is None


# -- drift ----------------------------------------------------------------------------------------------------
def test_drift_plot_draws_attention_and_mlp_per_point_over_the_layers():
    drift = pd.DataFrame([("a", 0, "attention", 0.01), ("a", 1, "attention", 0.03), ("a", 0, "mlp", 0.02),
                          ("b", 0, "attention", 0.05)], columns=["point", "layer", "group", "drift"])
    (ax,) = sweep_plots.drift_per_layer(drift).axes
    assert [line.get_label() for line in ax.lines] == ["a · attention", "a · mlp", "b · attention"]
    assert list(ax.lines[0].get_xdata()) == [0, 1] and list(ax.lines[0].get_ydata()) == [0.01, 0.03]


def test_plots_skip_what_the_sweep_did_not_log(runs):
    empty = runs[["run_id", "status", "start_time", "tags.dlm.point", "tags.dlm.point_index"]]
    points = points_frame(empty)
    assert sweep_plots.accuracy_vs_block_size(points, eval_frame(empty), task="gsm8k", metric="acc") is None
    assert sweep_plots.accuracy_vs_tpf(points, bench_frame(empty)) is None
    assert sweep_plots.drift_per_layer(drift_frame(empty)) is None


# -- labels and saving ----------------------------------------------------------------------------------------
def test_varying_names_the_descriptors_that_differ_between_points_in_line_key_order():
    points = points_of({"point": "a", "lr": 1e-4, "pattern": "block"}, {"point": "b", "lr": 1e-5, "pattern": "block"},
                       {"point": "c", "lr": 1e-5, "pattern": "block_clean"})
    assert sweep_plots.varying(points) == ["pattern", "lr"]
    assert sweep_plots.varying(points.drop(columns="lr")) == ["pattern"]


def test_label_shows_the_pattern_bare_and_other_descriptors_as_key_value():
    row = points_of({"point": "p", "pattern": "block", "shift": True, "half_life": 0.25, "lr": 1e-05}).iloc[0]
    assert sweep_plots.label(row, ["pattern", "shift", "half_life", "lr"]) == "block, shift=True, λ=0.25, lr=1e-05"
    assert sweep_plots.label(row, []) == "block"


def test_save_writes_a_png_creating_parent_folders(tmp_path):
    drift = pd.DataFrame([("a", 0, "mlp", 0.02)], columns=["point", "layer", "group", "drift"])
    path = sweep_plots.save(sweep_plots.drift_per_layer(drift), tmp_path / "report" / "nested" / "drift.png")
    assert path == tmp_path / "report" / "nested" / "drift.png" and path.read_bytes().startswith(PNG)


# -- joint objective: AR mode and self-speculative decoding ----------------------------------------------------
def test_speculative_plot_shows_exact_match_and_tokens_per_forward_per_point():
    points = points_of({"point": "blk", "clean_context": "block", "ar_weight": 0.0},
                       {"point": "joint", "clean_context": "causal", "ar_weight": 1.0})
    bench = bench_of(("blk", "ar-self", 1, None, 1.0, 0.5), ("blk", "dlm", 1, 0.9, 3.0, 0.75),
                     ("joint", "ar-self", 1, None, 1.0, 1.0), ("joint", "dlm", 1, 0.9, 2.5, 0.875),
                     ("joint", "spec", 1, None, 3.5, 1.0), ("joint", "spec-sep", 1, None, 1.75, 1.0),
                     ("joint", "spec", 4, None, 9.0, 1.0))
    left, right = sweep_plots.speculative(points, bench).axes
    assert [bar.get_height() for bar in left.patches] == [0.5, 1.0, 0.75, 0.875]  # AR mode, then threshold
    assert [bar.get_height() for bar in right.patches] == [3.0, 2.5, 0, 3.5, 0, 1.75]  # blk has no speculative
    assert [t.get_text() for t in right.get_xticklabels()] == ["clean_context=block, ar_weight=0",
                                                               "clean_context=causal, ar_weight=1"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["threshold 0.9", "speculative, fused",
                                                                     "speculative, separate"]


def test_speculative_plot_without_an_ar_mode_row_is_none():
    points = points_of({"point": "a"})
    assert sweep_plots.speculative(points, bench_of(("a", "dlm", 1, 0.9, 2.0, 0.5))) is None
