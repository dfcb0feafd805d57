"""Sweep figures from the tidy frames of `dlm.experiments.report` (points, eval, bench, drift), for
`dlm report` and the notebook.

Each function returns a Matplotlib `Figure` (or None when the sweep logged nothing to draw) built on
a bare Agg canvas, not pyplot: it works headless and leaves a notebook's backend and figure list
alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

LINE_KEYS = ("pattern", "shift", "block_size", "strategy", "half_life", "lr", "clean_context",
             "ar_weight")
"""Point descriptors (`dlm.experiments.report.DESCRIBE`) that name a line when they vary across the
sweep."""


def _figure(width: float = 7, height: float = 4.2) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """The figure as a PNG at `path` (parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def varying(points: pd.DataFrame, keys: Sequence[str] = LINE_KEYS) -> list[str]:
    """The descriptor columns whose value differs between points."""
    return [k for k in keys if k in points and points[k].astype(str).nunique() > 1]


def label(row: pd.Series, keys: Sequence[str]) -> str:
    """`block_clean, shift=True`: the pattern bare, the other varying descriptors as key=value (λ
    for half_life)."""
    parts = []
    for k in keys:
        value, name = row[k], "λ" if k == "half_life" else k
        if k in ("pattern", "strategy"):
            parts.append(str(value))
        else:
            parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts) or str(row.get("pattern", row["point"]))


def accuracy_vs_block_size(points: pd.DataFrame, evals: pd.DataFrame, *, task: str,
                           metric: str) -> Figure | None:
    """Accuracy vs block size. Decode block sizes swept: one line per trained point over the decode
    size. Else one line per pattern (and other varying settings) over the training block size, or
    bars when the sweep has a single block size (the attention-pattern sweep)."""
    scores = evals[(evals["task"] == task) & (evals["metric"] == metric)].merge(points, on="point")
    if scores.empty:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    if scores.groupby("point")["decode_block_size"].nunique().max() > 1:
        keys = varying(points) or ["block_size"]
        for i, (point, group) in enumerate(scores.groupby("point", sort=False)):
            group = group.sort_values("decode_block_size")
            ax.plot(group["decode_block_size"], group["value"], "o-", color=f"C{i % 10}",
                    label=label(group.iloc[0], keys).replace("block_size=", "train block "))
        _log2_axis(ax, scores["decode_block_size"], "decode block size")
    elif scores["block_size"].nunique() > 1:
        keys = [k for k in varying(points) if k != "block_size"]
        groups = scores.groupby([scores.apply(lambda r: label(r, keys), axis=1)], sort=False)
        for i, ((name,), group) in enumerate(groups):
            group = group.sort_values("block_size")
            ax.plot(group["block_size"], group["value"], "o-", color=f"C{i % 10}", label=name)
        _log2_axis(ax, scores["block_size"], "training block size")
    else:
        keys = varying(points)
        names = [label(r, keys) for _, r in scores.iterrows()]
        ax.bar(range(len(names)), scores["value"], color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel(f"block size {scores['block_size'].iloc[0]}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set(ylabel=f"{task} {metric}", title="Accuracy vs block size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _log2_axis(ax, values: pd.Series, name: str) -> None:
    ticks = sorted(values.unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(name)


def accuracy_vs_tpf(points: pd.DataFrame, bench: pd.DataFrame) -> Figure | None:
    """Bench exact match vs tokens per forward of the cached decoder, one line per point over the
    confidence thresholds (smallest bench batch size); solid = position-dependent masking, dashed =
    uniform, λ in the label (Efficient-DLM Fig. 5)."""
    if bench.empty or "exact_match" not in bench or bench["exact_match"].isna().all():
        return None
    rows = bench[(bench["method"] == "dlm") & bench["exact_match"].notna()]
    rows = rows[rows["batch_size"] == rows["batch_size"].min()].merge(points, on="point")
    if rows.empty:
        return None
    # the line style already tells uniform from position
    keys = varying(points) or ["strategy"]
    fig = _figure()
    ax = fig.add_subplot()
    for i, (point, group) in enumerate(rows.groupby("point", sort=False)):
        group = group.sort_values("tpf")
        first = group.iloc[0]
        style = "--" if first["strategy"] == "uniform" else "-"
        position = first["strategy"] == "position"
        name = label(first, [k for k in keys if k != "half_life" or position])
        ax.plot(group["tpf"], group["exact_match"], style, marker="o", color=f"C{i % 10}",
                label=name)
        for _, r in group.iterrows():
            ax.annotate(f"τ={r['threshold']:g}", (r["tpf"], r["exact_match"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i % 10}")
    ax.set(xlabel="tokens per forward (TPF)", ylabel="exact match (bench prompts)",
           title=f"Accuracy vs TPF, cached decoder, batch {int(rows['batch_size'].iloc[0])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speculative(points: pd.DataFrame, bench: pd.DataFrame) -> Figure | None:
    """Joint-objective sweeps, per point (smallest bench batch): left, exact match of the dLM's own
    AR mode and of threshold decoding (is the converted model still a good AR model, and a good
    dLM?); right, tokens per forward of threshold decoding and of the self-speculative forms
    (lossless)."""
    if bench.empty or "ar-self" not in set(bench["method"]):
        return None
    rows = bench[bench["batch_size"] == bench["batch_size"].min()]
    names = [label(r, varying(points)) for _, r in points.iterrows()]
    threshold = rows.loc[rows["method"] == "dlm", "threshold"].max()
    pick = {"AR mode": ("ar-self", None), f"threshold {threshold:g}": ("dlm", threshold),
            "speculative, fused": ("spec", None), "speculative, separate": ("spec-sep", None),
            "speculative, branched": ("spec-br", None)}
    fig = _figure(11, 4.2)
    for panel, (key, title, shown) in enumerate([("exact_match", "Exact match", list(pick)[:2]),
                                                 ("tpf", "Tokens per forward", list(pick)[1:])]):
        ax = fig.add_subplot(1, 2, panel + 1)
        width = 0.8 / len(shown)
        for i, series in enumerate(shown):
            method, t = pick[series]
            at_threshold = (rows["threshold"] == t) if t is not None else True
            sel = rows[(rows["method"] == method) & at_threshold]
            if sel.empty:
                continue
            values = points["point"].map(sel.set_index("point")[key]).fillna(0)
            ax.bar([x + i * width for x in range(len(names))], values, width, label=series,
                   color=f"C{list(pick).index(series)}")
        centres = [x + width * (len(shown) - 1) / 2 for x in range(len(names))]
        ax.set_xticks(centres, names, rotation=20, ha="right", fontsize=8)
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def drift_per_layer(drift: pd.DataFrame) -> Figure | None:
    """Relative weight drift per decoder layer, attention and MLP, one colour per point (the figure
    of `dlm.measurement.drift`)."""
    if drift.empty:
        return None
    from dlm.measurement.drift import DriftReport, drift_figure

    reports = {point: DriftReport({(int(r.layer), r.group): float(r.drift)
                                   for r in group.itertuples()})
               for point, group in drift.groupby("point", sort=False)}
    return drift_figure(reports)
