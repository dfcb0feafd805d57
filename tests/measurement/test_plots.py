"""The bench figures: the Pareto frontier on hand-checked points, and the PNG's panels."""

from __future__ import annotations

import matplotlib.image

from dlm.measurement.plots import pareto_front, pareto_plot


def _rows(scored: bool) -> list[dict]:
    def row(method, batch_size, threshold, tps, tpf, acc):
        return dict(method=method, batch_size=batch_size, threshold=threshold, tokens_per_sec=tps,
                    tokens_per_sec_min=tps * 0.9, tokens_per_sec_max=tps * 1.1, tpf=tpf,
                    exact_match=acc if scored else None)

    return [row("ar", 1, None, 100, 1.0, 0.37), row("dlm-1tpf", 1, None, 80, 1.0, 0.37),
            row("dlm", 1, 0.5, 240, 3.0, 0.36), row("dlm", 1, 0.9, 200, 2.5, 0.41),
            row("dlm-nocache", 1, 0.9, 60, 2.5, 0.41), row("ar", 4, None, 300, 0.9, 0.37),
            row("dlm", 4, 0.9, 500, 2.3, 0.40)]


def test_pareto_front_keeps_points_no_other_beats_on_both_axes():
    points = [(1.0, 0.37), (2.5, 0.41), (3.0, 0.36), (2.3, 0.40), (1.0, 0.30), (3.0, 0.20)]
    assert pareto_front(points) == [(2.5, 0.41), (3.0, 0.36)]
    assert pareto_front([(1.0, 0.5), (2.0, 0.5)]) == [(2.0, 0.5)]
    assert pareto_front([]) == []


def test_scored_rows_get_an_accuracy_panel_beside_throughput(tmp_path):
    two = matplotlib.image.imread(pareto_plot(_rows(scored=True), tmp_path / "a/scored.png",
                                              meta={"max_new_tokens": 8}))
    one = matplotlib.image.imread(pareto_plot(_rows(scored=False), tmp_path / "unscored.png"))
    assert two.shape[0] == one.shape[0] and two.shape[1] > 1.5 * one.shape[1]  # (H, W, RGBA): a second panel
    assert two.std() > 0.05  # something was drawn
