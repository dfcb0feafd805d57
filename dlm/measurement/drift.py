"""Weight drift of a converted model from its initial AR weights, per decoder layer (Efficient-DLM
Fig. 2e, 4).

Relative drift of a group = sum |W - W_ref| / sum |W_ref| over every entry of the group's weight
matrices, i.e. mean |ΔW| / mean |W_ref| over their concatenated entries, so a large matrix weighs
more than a small one. Groups per decoder layer i: `attention` = the matrices under
`layers.<i>.self_attn.` (q/k/v/o projections), `mlp` = the matrices under `layers.<i>.mlp.`
(gate/up/down). Only 2-D weights count: norm scales (Qwen3 q_norm/k_norm) and biases (Qwen2 q/k/v)
are vectors around a fixed value whose relative change does not compare with a matrix's, and leaving
them out gives Qwen2, Qwen3, Llama and Mistral the same seven matrices per layer. The paper's
reading: bidirectional attention drifts most, and larger diffusion blocks drift more.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from dlm.settings import ConfigError, DriftConfig, LogTarget
from dlm.tracking import runs

# torch and matplotlib load inside the functions: the drift callback's import stays light
if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor, nn

StateDict = Mapping[str, "Tensor"]
GROUPS = {"self_attn": "attention", "mlp": "mlp"}
"""HF submodule name -> drift group."""
_LAYER_PARAM = re.compile(r"(?:^|\.)(layers\.(\d+)\.(self_attn|mlp)\..+)$")


@dataclass(frozen=True)
class LayerParam:
    name: str  # full state-dict name, e.g. model.layers.0.self_attn.q_proj.weight
    layer: int
    group: str  # attention | mlp


def layer_parameters(state: StateDict) -> dict[str, LayerParam]:
    """Tensors under `layers.<i>.self_attn|mlp.`, keyed by their name from `layers.` on.

    Keying from `layers.` on matches a bare HF model (`model.layers.0...`) with the same model
    wrapped in a LightningModule (`model.model.layers.0...`) or by torch.compile
    (`_orig_mod.model.layers.0...`).
    """
    found: dict[str, LayerParam] = {}
    for name in state:
        m = _LAYER_PARAM.search(name)
        if m is None:
            continue
        if m.group(1) in found:
            raise ConfigError(f"parameter {name!r}: a second decoder stack besides "
                              f"{found[m.group(1)].name!r}; drift reads one stack")
        found[m.group(1)] = LayerParam(name, int(m.group(2)), GROUPS[m.group(3)])
    return found


def discover_groups(state: StateDict) -> dict[tuple[int, str], list[str]]:
    """(layer, group) -> names of the weight matrices whose drift that group reports."""
    groups: dict[tuple[int, str], list[str]] = {}
    for p in layer_parameters(state).values():
        if state[p.name].ndim >= 2:
            groups.setdefault((p.layer, p.group), []).append(p.name)
    return groups


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """CPU copy of the tensors `weight_drift` reads: decoder-layer attention/MLP only, not the
    embeddings."""
    state = model.state_dict()
    return {p.name: state[p.name].detach().to("cpu", copy=True)
            for p in layer_parameters(state).values()}


@dataclass(frozen=True)
class DriftReport:
    """Relative drift per (layer, group). `skipped`: parameters outside the decoder layers whose
    shapes differ from the reference (e.g. embeddings grown for [MASK]); they are in no number
    here."""

    drift: dict[tuple[int, str], float]
    skipped: tuple[str, ...] = ()

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.drift})

    @property
    def groups(self) -> list[str]:
        return [g for g in GROUPS.values() if any(group == g for _, group in self.drift)]

    def series(self, group: str) -> tuple[list[int], list[float]]:
        """(layers, drift) of one group, by layer."""
        layers = [layer for layer in self.layers if (layer, group) in self.drift]
        return layers, [self.drift[(layer, group)] for layer in layers]

    def mean(self, group: str) -> float:
        """Unweighted mean over layers of the group's per-layer drift (each layer counts once, as in
        the plot)."""
        values = self.series(group)[1]
        return sum(values) / len(values)

    def as_metrics(self, prefix: str = "drift") -> dict[str, float]:
        """`{prefix}/layer_00/attention`, ..., `{prefix}/attention_mean`; layer numbers zero-padded
        so they sort."""
        width = max(2, len(str(self.layers[-1])))
        metrics = {f"{prefix}/layer_{layer:0{width}d}/{group}": v
                   for (layer, group), v in sorted(self.drift.items())}
        return metrics | {f"{prefix}/{group}_mean": self.mean(group) for group in self.groups}

    def table(self) -> str:
        """Per-layer rows, a mean row, then one line per skipped parameter; for `dlm drift` and
        notebooks."""
        cell = lambda layer, g: (f"{self.drift[(layer, g)]:>12.4e}"  # noqa: E731
                                 if (layer, g) in self.drift else f"{'-':>12}")
        lines = ["layer " + "".join(f"{g:>12}" for g in self.groups)]
        lines += [f"{layer:<6}" + "".join(cell(layer, g) for g in self.groups)
                  for layer in self.layers]
        lines.append("mean  " + "".join(f"{self.mean(g):>12.4e}" for g in self.groups))
        lines += [f"skipped (shape differs from the reference): {s}" for s in self.skipped]
        return "\n".join(lines)


def _check_architecture(params: dict[str, LayerParam], state: StateDict,
                        ref_params: dict[str, LayerParam], reference: StateDict) -> None:
    """Fail on the first attention/MLP tensor (matrix, norm or bias) the two models do not share at
    one shape."""
    # a stable "first": any file order
    for key, p in sorted(params.items(), key=lambda kv: (kv[1].layer, kv[0])):
        if key not in ref_params:
            raise ConfigError(f"parameter {p.name!r}: missing from the reference; "
                              "the architectures differ")
        ref_shape, shape = tuple(reference[ref_params[key].name].shape), tuple(state[p.name].shape)
        if ref_shape != shape:
            raise ConfigError(f"parameter {p.name!r}: shape {shape} vs {ref_shape} "
                              "in the reference; the architectures differ")
    for key, p in sorted(ref_params.items(), key=lambda kv: (kv[1].layer, kv[0])):
        if key not in params:
            raise ConfigError(f"parameter {p.name!r}: in the reference, missing from the model; "
                              "the architectures differ")


def weight_drift(model_or_state_dict: nn.Module | StateDict,
                 reference_state_dict: StateDict) -> DriftReport:
    """Relative drift (module docstring) of every decoder layer's attention and MLP from
    `reference_state_dict`.

    Raises ConfigError naming the first attention/MLP parameter the two do not share at the same
    shape. Each reference tensor moves to its weight's device one at a time, so a CPU reference
    serves a GPU model.
    """
    import torch

    m = model_or_state_dict
    state = m.state_dict() if isinstance(m, torch.nn.Module) else m
    params, ref_params = layer_parameters(state), layer_parameters(reference_state_dict)
    if not params:
        raise ConfigError("model: no decoder-layer weights; "
                          "expected names like model.layers.0.self_attn.q_proj.weight")
    _check_architecture(params, state, ref_params, reference_state_dict)
    sums: dict[tuple[int, str], list[float]] = {}  # (layer, group) -> [sum |ΔW|, sum |W_ref|]
    with torch.no_grad():
        for key, p in params.items():
            w = state[p.name].detach()
            if w.ndim < 2:
                continue
            ref = reference_state_dict[ref_params[key].name].to(w.device).float()
            acc = sums.setdefault((p.layer, p.group), [0.0, 0.0])
            acc[0] += (w.float() - ref).abs().sum(dtype=torch.float64).item()
            acc[1] += ref.abs().sum(dtype=torch.float64).item()
    layer_names = {p.name for p in params.values()}
    skipped = tuple(f"{n} {tuple(t.shape)} vs {tuple(reference_state_dict[n].shape)}"
                    for n, t in state.items()
                    if n not in layer_names and n in reference_state_dict
                    and t.shape != reference_state_dict[n].shape)
    return DriftReport({k: d / b if b else math.nan for k, (d, b) in sums.items()}, skipped)


def drift_figure(report_or_reports: DriftReport | Mapping[str, DriftReport]) -> Figure:
    """Relative drift vs layer, as Efficient-DLM Fig. 4: a colour per run (keys label it), a line
    style per group.

    A bare Agg canvas (no pyplot): works headless and leaves a notebook's backend and figure list
    alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    reports = ({"": report_or_reports} if isinstance(report_or_reports, DriftReport)
               else dict(report_or_reports))
    styles = {"attention": ("-", "o"), "mlp": ("--", "s")}
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (run, report) in enumerate(reports.items()):
        for group in report.groups:
            layers, values = report.series(group)
            line, marker = styles[group]
            label = f"{run} · {group}" if run else group
            ax.plot(layers, values, line, marker=marker, color=f"C{i % 10}", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="decoder layer", ylabel="relative drift  Σ|W − W_ref| / Σ|W_ref|",
           title="Weight drift from the initial AR weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def drift_plot(report_or_reports: DriftReport | Mapping[str, DriftReport],
               path: str | Path) -> Path:
    """`drift_figure` saved as a PNG at `path` (parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    drift_figure(report_or_reports).savefig(out, dpi=120)
    return out


def load_weights(path: str | Path, *, key: str = "checkpoint") -> dict[str, Tensor]:
    """Every tensor of a local HF model folder (`model*.safetensors`, else `pytorch_model*.bin`), on
    CPU.

    Reads no config and builds no model, so any architecture loads and a mismatch is reported by
    name.
    """
    import torch

    from dlm.models.backbone import check_weight_files

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: no such folder "
                          "(a hub id or .gguf file: `dlm import` it to a folder first)")
    check_weight_files(folder, key=key)  # truncated or pickled files fail in one line
    if files := sorted(folder.glob("model*.safetensors")):
        from safetensors.torch import load_file

        return {name: t for f in files for name, t in load_file(f).items()}
    if files := sorted(folder.glob("pytorch_model*.bin")):
        return {name: t for f in files
                for name, t in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise ConfigError(f"{key}={str(path)!r}: no weights in the folder; "
                      "allowed: model*.safetensors, pytorch_model*.bin")


def checkpoint_drift(checkpoints: Sequence[str], settings: DriftConfig, *,
                     log: LogTarget | None = None) -> dict[str, DriftReport]:
    """`dlm drift`: each checkpoint's drift from `settings.reference`; the figure to
    `settings.plot`, and with `log.mlflow_run` (one checkpoint) the metrics and the figure into that
    run."""
    log = log or LogTarget()
    if log.mlflow_run and len(checkpoints) > 1:
        raise ConfigError(f"mlflow_run={log.mlflow_run!r}: logs one checkpoint; "
                          f"got {len(checkpoints)}")
    if log.mlflow_run:
        runs.check_run(log.mlflow_run, log.tracking_uri)
    reference = load_weights(settings.reference, key="reference")
    reports: dict[str, DriftReport] = {}
    for ckpt in checkpoints:
        try:
            reports[ckpt] = weight_drift(load_weights(ckpt), reference)
        except ConfigError as err:
            raise ConfigError(f"checkpoint={ckpt!r} vs "
                              f"reference={settings.reference!r}: {err}") from None
    if settings.plot:
        drift_plot(reports if len(reports) > 1 else next(iter(reports.values())), settings.plot)
    if log.mlflow_run:
        _log_to_mlflow(reports[checkpoints[0]], settings, log)
    return reports


def _log_to_mlflow(report: DriftReport, settings: DriftConfig, log: LogTarget) -> None:
    runs.log_metrics(log.mlflow_run, log.tracking_uri, report.as_metrics(), step=settings.step)
    with tempfile.TemporaryDirectory() as tmp:
        plot = (Path(settings.plot) if settings.plot
                else drift_plot(report, Path(tmp) / "weight_drift.png"))
        runs.log_artifacts(log.mlflow_run, log.tracking_uri, [plot])
