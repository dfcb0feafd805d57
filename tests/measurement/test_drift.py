"""Weight drift: exact values on hand-built weights, layer/group discovery on real tiny HF models, the CLI."""

from __future__ import annotations

import pytest
import torch

from dlm.cli.main import build_parser
from dlm.measurement.drift import DriftReport, discover_groups, drift_figure, drift_plot, layer_parameters, weight_drift
from dlm.models.checkpoint import CheckpointMeta, save_checkpoint
from dlm.settings import ConfigError
from tests.conftest import make_backbone

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hand_built() -> dict[str, torch.Tensor]:
    """Two layers; group sums of |W|: attention 4 + 8 = 12, mlp 4 + 4 = 8 in each layer."""
    state = {"model.embed_tokens.weight": torch.zeros(5, 2)}
    for i in (0, 1):
        state |= {f"model.layers.{i}.self_attn.q_proj.weight": torch.ones(2, 2),
                  f"model.layers.{i}.self_attn.o_proj.weight": torch.full((2, 2), -2.0),
                  f"model.layers.{i}.self_attn.q_norm.weight": torch.ones(2),
                  f"model.layers.{i}.mlp.up_proj.weight": torch.full((4, 2), 0.5),
                  f"model.layers.{i}.mlp.down_proj.weight": torch.full((2, 4), -0.5),
                  f"model.layers.{i}.input_layernorm.weight": torch.ones(2)}
    return state


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def test_hand_built_drift_is_sum_abs_delta_over_sum_abs_reference_per_group():
    ref, new = _hand_built(), _clone(_hand_built())
    new["model.layers.0.self_attn.q_proj.weight"][0, 0] += 0.6   # |ΔW| 0.6
    new["model.layers.0.self_attn.o_proj.weight"][1, 1] -= 0.3   # |ΔW| 0.3 -> layer 0 attention 0.9 / 12
    new["model.layers.1.mlp.up_proj.weight"][0] += 1.0           # two entries -> layer 1 mlp 2 / 8
    new["model.layers.1.self_attn.q_norm.weight"] += 100.0       # norm scales are not counted
    new["model.layers.1.input_layernorm.weight"] += 100.0        # nor are the layer norms
    report = weight_drift(new, ref)
    assert report.as_metrics() == pytest.approx({
        "drift/layer_00/attention": 0.075, "drift/layer_00/mlp": 0.0,
        "drift/layer_01/attention": 0.0, "drift/layer_01/mlp": 0.25,
        "drift/attention_mean": 0.0375, "drift/mlp_mean": 0.125,
    })
    assert list(report.as_metrics(prefix="x"))[0] == "x/layer_00/attention"


def test_identical_weights_give_zero_drift(qwen3):
    report = weight_drift(qwen3.model, _clone(qwen3.model.state_dict()))
    assert report.layers == [0, 1] and report.groups == ["attention", "mlp"]
    assert set(report.as_metrics().values()) == {0.0}
    assert report.skipped == ()


def test_scaled_q_proj_drifts_only_its_layer_attention_by_its_share_of_the_group(qwen3):
    ref = _clone(qwen3.model.state_dict())
    with torch.no_grad():
        qwen3.model.model.layers[1].self_attn.q_proj.weight.mul_(1.1)
    report = weight_drift(qwen3.model, ref)
    abs_sum = lambda p: ref[f"model.layers.1.self_attn.{p}_proj.weight"].abs().sum().item()  # noqa: E731
    expected = 0.1 * abs_sum("q") / sum(abs_sum(p) for p in "qkvo")
    assert report.drift[(1, "attention")] == pytest.approx(expected, rel=1e-5)
    assert report.drift[(0, "attention")] == report.drift[(0, "mlp")] == report.drift[(1, "mlp")] == 0.0


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_groups_are_the_seven_projection_matrices_of_each_layer(arch, tokenizer):
    state = make_backbone(arch, tokenizer).model.state_dict()
    expected = {}
    for i in (0, 1):
        expected[(i, "attention")] = [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        expected[(i, "mlp")] = [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert discover_groups(state) == expected
    norms = {p.name for p in layer_parameters(state).values()} - {n for names in expected.values() for n in names}
    assert norms == ({f"model.layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "qk"} if arch == "qwen3"
                     else set())


def test_wrapped_names_match_the_bare_model_and_resized_embeddings_are_skipped(qwen3):
    ref = _clone(qwen3.model.state_dict())
    ref["model.embed_tokens.weight"] = ref["model.embed_tokens.weight"][:-1]  # the AR model before [MASK] was added
    wrapped = {f"model.{k}": v for k, v in qwen3.model.state_dict().items()}  # DiffusionLM's state-dict names
    assert set(weight_drift(wrapped, ref).as_metrics().values()) == {0.0}
    report = weight_drift(qwen3.model, ref)
    assert report.skipped == ("model.embed_tokens.weight (384, 64) vs (383, 64)",)
    assert report.table().splitlines()[-1] == ("skipped (shape differs from the reference): "
                                               "model.embed_tokens.weight (384, 64) vs (383, 64)")


def test_mismatched_architectures_name_the_first_differing_parameter(qwen3, tokenizer):
    llama = make_backbone("llama", tokenizer).model.state_dict()
    with pytest.raises(ConfigError, match=r"^parameter 'model.layers.0.self_attn.k_norm.weight': "
                                          r"missing from the reference"):
        weight_drift(qwen3.model, llama)
    with pytest.raises(ConfigError, match=r"^parameter 'model.layers.0.self_attn.k_norm.weight': "
                                          r"in the reference, missing from the model"):
        weight_drift(llama, qwen3.model.state_dict())
    fewer_layers = {k: v for k, v in qwen3.model.state_dict().items() if ".layers.1." not in k}
    with pytest.raises(ConfigError, match=r"^parameter 'model.layers.1.mlp.down_proj.weight': "
                                          r"missing from the reference"):
        weight_drift(qwen3.model, fewer_layers)
    narrower = _clone(qwen3.model.state_dict()) | {"model.layers.0.mlp.up_proj.weight": torch.ones(96, 64)}
    with pytest.raises(ConfigError, match=r"up_proj.weight': shape \(128, 64\) vs \(96, 64\) in the reference"):
        weight_drift(qwen3.model, narrower)
    with pytest.raises(ConfigError, match="no decoder-layer weights"):
        weight_drift({"lm_head.weight": torch.ones(2, 2)}, {})


def test_table_has_a_row_per_layer_and_a_mean_row():
    ref, new = _hand_built(), _clone(_hand_built())
    new["model.layers.1.mlp.up_proj.weight"][0] += 1.0
    assert weight_drift(new, ref).table().splitlines() == [
        "layer    attention         mlp",
        "0       0.0000e+00  0.0000e+00",
        "1       0.0000e+00  2.5000e-01",
        "mean    0.0000e+00  1.2500e-01",
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """An AR checkpoint, the same with layer 1's q_proj scaled by 1.1, and a plain HF Llama folder."""
    tmp = tmp_path_factory.mktemp("drift_ckpts")
    ar = make_backbone("qwen3", tokenizer)
    meta = CheckpointMeta("causal", 4, ar.tokenizer.mask_token, ar.mask_token_id)
    save_checkpoint(ar.model, ar.tokenizer, meta, tmp / "ar")
    expected = _clone(ar.model.state_dict())
    with torch.no_grad():
        ar.model.model.layers[1].self_attn.q_proj.weight.mul_(1.1)
    save_checkpoint(ar.model, ar.tokenizer, meta, tmp / "converted")
    make_backbone("llama", tokenizer).model.save_pretrained(tmp / "llama")
    return tmp, weight_drift(ar.model, expected)


def _drift_cli(*argv: str) -> dict[str, DriftReport]:
    args = build_parser().parse_args(["drift", *argv])
    return args.func(args)


def test_cli_prints_the_table_and_writes_the_plot(checkpoints, tmp_path, capsys):
    ckpts, expected = checkpoints
    reports = _drift_cli(str(ckpts / "converted"), "--reference", str(ckpts / "ar"), "--plot", str(tmp_path / "d.png"))
    assert reports[str(ckpts / "converted")].drift == pytest.approx(expected.drift)
    out = capsys.readouterr().out
    assert expected.table() in out and f"plot: {tmp_path / 'd.png'}" in out
    assert (tmp_path / "d.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_errors_are_one_line(checkpoints, tmp_path):
    ckpts, _ = checkpoints
    with pytest.raises(ConfigError, match=r"^reference='.*/missing': no such folder \(a hub id or .gguf file: "
                                          r"`dlm import` it to a folder first\)$"):
        _drift_cli(str(ckpts / "converted"), "--reference", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^checkpoint='.*': no weights in the folder; allowed: model\*.safetensors"):
        _drift_cli(str(tmp_path), "--reference", str(ckpts / "ar"))
    with pytest.raises(ConfigError, match=r"^checkpoint='.*/converted' vs reference='.*/llama': parameter "
                                          r"'model.layers.0.self_attn.k_norm.weight': missing from the reference"):
        _drift_cli(str(ckpts / "converted"), "--reference", str(ckpts / "llama"))
    with pytest.raises(ConfigError, match=r"^mlflow_run='r': logs one checkpoint; got 2$"):
        _drift_cli(str(ckpts / "ar"), str(ckpts / "converted"), "--reference", str(ckpts / "ar"), "--mlflow-run", "r")


def test_figure_of_several_runs_draws_a_line_per_run_and_group(checkpoints, tmp_path):
    _, report = checkpoints
    (ax,) = drift_figure({"block 4": report, "block 16": report}).axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert list(lines) == ["block 4 · attention", "block 4 · mlp", "block 16 · attention", "block 16 · mlp"]
    assert lines["block 16 · attention"] == ([0, 1], [0.0, report.drift[(1, "attention")]])
    path = drift_plot(report, tmp_path / "sub" / "one.png")
    assert path == tmp_path / "sub" / "one.png" and path.read_bytes().startswith(PNG_MAGIC)
