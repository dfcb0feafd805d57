"""Figures from `dlm bench` rows (the dicts in `bench.json`), so a plot can be redrawn without
re-running.

One function per figure. Matplotlib runs headless (Agg): benches run on servers and in CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

Row = Mapping[str, Any]
"""A `dlm.measurement.grid.BenchRow` as a dict: method, batch_size, threshold,
tokens_per_sec(_min/_max), tpf, exact_match."""


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better on both), by ascending x."""
    front: list[tuple[float, float]] = []
    # from the right: keep a point if it is higher
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front[::-1]


def _by(rows: Sequence[Row], method: str, batch_size: int) -> list[Row]:
    """The rows of `method` at `batch_size` by TPF; `bench.decoders` rows are points of their own,
    not on a curve."""
    return sorted((r for r in rows if r["method"] == method and r["batch_size"] == batch_size
                   and not r.get("decoder")), key=lambda r: r["tpf"])


def _decoder_points(ax: Axes, rows: Sequence[Row], key: str, color, size) -> None:
    """`bench.decoders` rows: a diamond each, labelled with its setting."""
    for r in rows:
        if r.get("decoder") and r[key] is not None:
            ax.scatter(r["tpf"], r[key], s=size(r), marker="D", color=color, edgecolor="black",
                       linewidth=0.5, zorder=3)
            ax.annotate(r["decoder"], (r["tpf"], r[key]), textcoords="offset points",
                        xytext=(6, 5), fontsize=7, color=color)


def _annotate_thresholds(ax: Axes, rows: Sequence[Row], key: str, color, below: bool) -> None:
    """Label each threshold point; alternate batch sizes go below, so equal thresholds do not
    overprint."""
    for r in rows:
        ax.annotate(f"τ={r['threshold']:g}", (r["tpf"], r[key]), textcoords="offset points",
                    xytext=(6, -13 if below else 5), fontsize=8, color=color)


def _one_token_line(ax: Axes) -> None:
    ax.axvline(1.0, color="0.6", linestyle=":", linewidth=1)
    ax.annotate("1 token / forward", (1.0, 0.0), xycoords=("data", "axes fraction"),
                xytext=(-11, 6), textcoords="offset points", fontsize=8, color="0.4", rotation=90,
                va="bottom")


def _accuracy_panel(ax: Axes, rows: Sequence[Row], batch_sizes: list[int],
                    colors: dict[int, Any]) -> None:
    """Exact match vs TPF; marker area ∝ tokens/s, so the fastest accurate setting stands out."""
    top = max(r["tokens_per_sec"] for r in rows)
    size = lambda r: 30 + 270 * r["tokens_per_sec"] / top  # noqa: E731
    for b in batch_sizes:
        c = colors[b]
        cached = _by(rows, "dlm", b)
        tpf, accuracy = [r["tpf"] for r in cached], [r["exact_match"] for r in cached]
        ax.plot(tpf, accuracy, color=c, alpha=0.6, zorder=1)
        ax.scatter(tpf, accuracy, s=[size(r) for r in cached], color=c, edgecolor="black",
                   linewidth=0.5, label=f"dLM cached, batch {b}", zorder=3)
        _annotate_thresholds(ax, cached, "exact_match", c, below=batch_sizes.index(b) % 2 == 1)
        _decoder_points(ax, [r for r in rows if r["batch_size"] == b], "exact_match", c, size)
        for r in _by(rows, "dlm-1tpf", b):
            ax.scatter(r["tpf"], r["exact_match"], s=size(r), marker="s", color=c,
                       edgecolor="black", linewidth=0.5, zorder=3)
        for r in _by(rows, "ar", b):
            ax.scatter(r["tpf"], r["exact_match"], s=size(r), marker="*", color=c,
                       edgecolor="black", linewidth=0.5, zorder=3)
    ar = [r for r in rows if r["method"] == "ar"]
    if ar:
        ax.axhline(ar[0]["exact_match"], color="0.3", linestyle="--", linewidth=1,
                   label="AR baseline accuracy")
    scored = [(r["tpf"], r["exact_match"]) for r in rows if r["method"] != "dlm-nocache"]
    front = pareto_front(scored)
    ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color="black",
            linewidth=0.8, alpha=0.5, linestyle="-.", label="Pareto frontier", zorder=2)
    ax.set(xlabel="tokens per forward (TPF)", ylabel="exact match",
           title="Accuracy vs TPF  (marker area ∝ tokens/s)")
    _zoom_accuracy(ax, [p[1] for p in scored])


def _zoom_accuracy(ax: Axes, values: Sequence[float]) -> None:
    """Zoom to the measured range (the differences are the point), with room for labels; no tick
    past 100%."""
    low, high = min(values), max(values)
    pad = 0.15 * (high - low) + 0.03
    ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 1])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _speed_panel(ax: Axes, rows: Sequence[Row], batch_sizes: list[int],
                 colors: dict[int, Any]) -> None:
    """tokens/s vs TPF with min–max bars; AR baseline and the 3× target as horizontal lines."""
    for b in batch_sizes:
        c = colors[b]
        styles = (("dlm", "o", c), ("dlm-fixed", "D", c), ("dlm-1tpf", "s", c),
                  ("dlm-nocache", "o", "none"), ("ar", "*", c), ("ar-hf", "X", c))
        for method, marker, fill in styles:
            pts = _by(rows, method, b)
            if not pts:
                continue
            err = [[r["tokens_per_sec"] - r["tokens_per_sec_min"] for r in pts],
                   [r["tokens_per_sec_max"] - r["tokens_per_sec"] for r in pts]]
            ax.errorbar([r["tpf"] for r in pts], [r["tokens_per_sec"] for r in pts], yerr=err,
                        fmt=marker, color=c, mfc=fill, ms=9 if marker == "*" else 6,
                        linestyle="-" if method == "dlm" else "none", alpha=0.9, capsize=2)
        below = batch_sizes.index(b) % 2 == 1
        _annotate_thresholds(ax, _by(rows, "dlm", b), "tokens_per_sec", c, below=below)
        for r in _by(rows, "dlm-nocache", b):
            policy = (f"τ={r['threshold']:g}" if r["threshold"] is not None
                      else f"n={r['tokens_per_pass']}")
            # left: cached τ labels sit on the right
            ax.annotate(f"no cache {policy}", (r["tpf"], r["tokens_per_sec"]),
                        textcoords="offset points", xytext=(-7, -11), ha="right", fontsize=8,
                        color=c)
        for r in _by(rows, "ar", b):
            ax.axhline(r["tokens_per_sec"], color=c, linestyle="--", linewidth=1, alpha=0.7)
            if b == batch_sizes[0]:
                ax.axhline(3 * r["tokens_per_sec"], color=c, linestyle=":", linewidth=1, alpha=0.7)
                ax.annotate(f"3× AR (batch {b})", (1.0, 3 * r["tokens_per_sec"]),
                            xycoords=("axes fraction", "data"), xytext=(-4, 3),
                            textcoords="offset points", ha="right", fontsize=8, color=c)
    ax.set(xlabel="tokens per forward (TPF)", ylabel="tokens / s (median, min–max)",
           title="Throughput vs TPF")
    ax.set_ylim(bottom=0)


def _legend_handles(batch_sizes: list[int], colors: dict[int, Any]) -> list:
    from matplotlib.lines import Line2D

    marks = [Line2D([], [], color=colors[b], marker="o", linestyle="-", label=f"batch {b}")
             for b in batch_sizes]
    kinds = [("o", "0.3", "dLM cached (τ = threshold)"),
             ("D", "0.3", "dLM cached, fixed n per pass"),
             ("s", "0.3", "dLM one token / forward"),
             ("o", "none", "dLM no cache"),
             ("*", "0.3", "AR, lean loop (dashed: its tokens/s)"),
             ("X", "0.3", "AR, transformers generate")]
    marks += [Line2D([], [], color="0.3", marker=m, mfc=f, linestyle="none", markersize=8, label=t)
              for m, f, t in kinds]
    return marks


def pareto_plot(rows: Sequence[Row], path: str | Path, *,
                meta: Mapping[str, Any] | None = None) -> Path:
    """Accuracy vs TPF (when rows carry exact match) beside tokens/s vs TPF; one colour per batch
    size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch_sizes = sorted({r["batch_size"] for r in rows})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(batch_sizes)}
    scored = all(r.get("exact_match") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(15.5 if scored else 9.5, 5.2),
                             squeeze=False)
    if scored:
        _accuracy_panel(axes[0, 0], rows, batch_sizes, colors)
    _speed_panel(axes[0, -1], rows, batch_sizes, colors)
    for ax in axes[0]:
        _one_token_line(ax)
        ax.grid(alpha=0.25)
        ax.set_xlim(left=min(0.9, min(r["tpf"] for r in rows) - 0.1))
    axes[0, -1].legend(handles=_legend_handles(batch_sizes, colors), fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # outside: never hides a point
    if scored:
        axes[0, 0].legend(fontsize=8, loc="lower right", framealpha=0.85)
    if meta:
        fig.suptitle(_subtitle(meta), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _subtitle(meta: Mapping[str, Any]) -> str:
    eos = ", EOS ignored" if meta.get("ignore_eos") else ""
    name = "/".join(Path(str(meta.get("checkpoint", ""))).parts[-2:])
    return (f"{name}: {meta.get('max_new_tokens')} new tokens{eos}, "
            f"block {meta.get('block_size')}, "
            f"{meta.get('num_prompts')} prompts, {meta.get('device')}; "
            f"AR baseline: {meta.get('ar_baseline')}")
