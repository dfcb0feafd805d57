"""`dlm average`: the written checkpoint holds the mean of its sources' weights (in their stored
dtype), decodes as they do, and bad sources fail in one line before any weight loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from dlm.cli.main import main
from dlm.models.averaging import average_checkpoints
from dlm.models.checkpoint import META_FILE, load_checkpoint, read_meta, save_checkpoint
from dlm.settings import ConfigError
from tests.conftest import make_backbone, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, dtype="float32")[0].model.state_dict()


@pytest.fixture
def three(tmp_path, tokenizer) -> list[Path]:
    """Three tiny block_clean checkpoints with different random weights."""
    return [save_tiny(make_backbone("qwen3", tokenizer, seed=seed), tmp_path / f"ckpt{seed}")
            for seed in range(3)]


def test_the_written_weights_are_the_mean(three, tmp_path, capsys):
    out = tmp_path / "avg"
    assert main(["average", *map(str, three), "--out", str(out)]) in (0, None)
    assert "averaged 3 checkpoints" in capsys.readouterr().out
    sources = [_weights(p) for p in three]
    averaged = _weights(out)
    for name, tensor in averaged.items():
        assert_close(tensor, sum(s[name] for s in sources) / 3)
    assert not torch.equal(averaged["model.embed_tokens.weight"],
                           sources[0]["model.embed_tokens.weight"])
    meta, first = read_meta(out), read_meta(three[0])
    assert dataclasses.replace(meta, source="") == first
    assert meta.source.startswith("average of 3: ") and str(three[2].resolve()) in meta.source


def test_stored_dtype_is_kept_and_rounded_from_the_float32_mean(tmp_path, tokenizer):
    sources = []
    for seed in range(2):
        bb = make_backbone("llama", tokenizer, seed=seed)
        bb.model.to(torch.bfloat16)
        sources.append(save_tiny(bb, tmp_path / f"bf16-{seed}"))
    out = average_checkpoints(sources, tmp_path / "avg")
    model = load_checkpoint(out, dtype="bfloat16")[0].model
    weights = [load_checkpoint(p, dtype="float32")[0].model.state_dict() for p in sources]
    name = "model.layers.0.mlp.up_proj.weight"
    expected = ((weights[0][name] + weights[1][name]) / 2).to(torch.bfloat16)
    assert torch.equal(model.state_dict()[name], expected)
    assert yaml.safe_load((out / "config.json").read_text())["dtype"] == "bfloat16"
    wide = average_checkpoints(sources, tmp_path / "avg32", dtype="float32")
    assert yaml.safe_load((wide / "config.json").read_text())["dtype"] == "float32"


def test_sources_that_decode_differently_are_refused_before_loading(three, tmp_path, tokenizer):
    other = tmp_path / "block8"
    bb = make_backbone("qwen3", tokenizer, seed=5)
    meta = dataclasses.replace(read_meta(three[0]), block_size=8)
    save_checkpoint(bb.model, bb.tokenizer, meta, other)
    with pytest.raises(ConfigError, match=r"block_size is 8, .*'s 4; allowed: checkpoints that "):
        average_checkpoints([three[0], other], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("case", ["one source", "out is a source", "bad dtype"])
def test_bad_arguments_fail_in_one_line(three, tmp_path, case):
    sources, out, dtype = {"one source": ([three[0]], tmp_path / "avg", None),
                           "out is a source": (three[:2], three[1], None),
                           "bad dtype": (three[:2], tmp_path / "avg", "int8")}[case]
    before = (three[1] / META_FILE).read_text()
    with pytest.raises(ConfigError, match={"one source": "need at least two",
                                           "out is a source": "one of the sources",
                                           "bad dtype": "unknown weight dtype"}[case]):
        average_checkpoints(sources, out, dtype=dtype)
    assert (three[1] / META_FILE).read_text() == before


def test_different_shapes_are_refused(three, tmp_path, tokenizer):
    llama = save_tiny(make_backbone("llama", tokenizer), tmp_path / "llama")
    with pytest.raises(ConfigError, match="its parameters differ"):
        average_checkpoints([three[0], llama], tmp_path / "avg")


def test_plain_hf_folders_average_to_a_plain_folder_with_tied_embeddings(tmp_path, tokenizer):
    """Two AR fine-tunes as plain HF folders (no dlm.yaml; tied embeddings, as SmolLM2's): the mean
    keeps their vocabulary and ties, and reads back as an AR checkpoint."""
    from tests.models.test_importing import tiny_llama

    folders = []
    for seed in range(2):
        folder = tmp_path / f"plain{seed}"
        tiny_llama(tied=True, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    out = average_checkpoints(folders, tmp_path / "avg")
    model = AutoModelForCausalLM.from_pretrained(out)
    sources = [AutoModelForCausalLM.from_pretrained(f) for f in folders]
    embed = model.get_input_embeddings().weight
    assert embed.shape == sources[0].get_input_embeddings().weight.shape
    assert_close(embed, sum(s.get_input_embeddings().weight for s in sources) / 2)
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert read_meta(out).attention_pattern.autoregressive
