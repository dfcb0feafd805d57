"""dlm checkpoints: atomic writes, one-line errors for a bad folder, a round trip to the same logits."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch
import yaml
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from dlm.models.backbone import forward_logits
from dlm.models.checkpoint import META_FILE, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from dlm.settings import ConfigError, load_config
from dlm.tensor import patterns
from dlm.tensor.attention import build_attention_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(bb, **kw):
    return CheckpointMeta(**({"pattern": "block", "block_size": 8, "mask_token": "<|mask|>",
                              "mask_token_id": bb.mask_token_id} | kw))


def _logits(model, ids, pattern="block_clean", block_size=4):
    seq_len = ids.shape[1] // 2 if patterns.get(pattern).two_halves else ids.shape[1]
    attn = build_attention_inputs(patterns.get(pattern, block_size=block_size), batch_size=ids.shape[0],
                                  seq_len=seq_len)
    with torch.no_grad():
        return forward_logits(model, ids, attn)


def test_save_writes_model_tokenizer_and_meta_and_leaves_no_partial(qwen3, tmp_path):
    meta = _meta(qwen3, shift=True, source_experiment="exp")
    out = save_checkpoint(qwen3.model, qwen3.tokenizer, meta, tmp_path / "final")
    assert out == tmp_path / "final"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", META_FILE} <= names
    assert yaml.safe_load((out / META_FILE).read_text()) == asdict(meta)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_stale_partial_from_a_killed_write_is_replaced(qwen3, tmp_path):
    stale = tmp_path / "final.partial"
    stale.mkdir()
    (stale / "half-written.bin").write_text("junk")
    out = save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3), tmp_path / "final")
    assert not stale.exists() and not (out / "half-written.bin").exists()
    assert read_meta(out) == _meta(qwen3)


def test_existing_checkpoint_is_kept_as_prev_with_a_timestamp(qwen3, tmp_path):
    first = save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3, block_size=4), tmp_path / "final")
    save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3, block_size=8), tmp_path / "final")
    (prev,) = [p for p in tmp_path.iterdir() if p.name != "final"]
    assert re.fullmatch(r"final\.prev-\d{8}-\d{6}", prev.name)
    assert read_meta(prev).block_size == 4 and read_meta(first).block_size == 8
    assert (prev / "model.safetensors").is_file()


def test_three_exports_within_one_second_keep_every_earlier_one(qwen3, tmp_path, monkeypatch):
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000")  # one second for all three
    for block_size in (2, 4, 8):
        save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3, block_size=block_size), tmp_path / "final")
    kept = {p.name: read_meta(p).block_size for p in tmp_path.iterdir()}
    assert kept == {"final": 8, "final.prev-20260101-000000": 2, "final.prev-20260101-000000-2": 4}


@pytest.mark.parametrize("change, match", [
    ({"pattern": "bogus"}, r"dlm\.yaml pattern='bogus': unknown pattern; allowed: bidirectional, block"),
    ({"block_size": "4"}, r"dlm\.yaml block_size='4': must be a positive integer"),
    ({"shift": 1}, r"dlm\.yaml shift=1: must be true or false"),
    ({"extra": 1}, r"dlm\.yaml extra: unknown key; allowed: pattern, block_size"),
    ({"clean_context": "tokens"}, r"dlm\.yaml clean_context='tokens': unknown clean context; allowed: block, causal"),
])
def test_read_meta_validates_dlm_yaml_like_a_config(qwen3, tmp_path, change, match):
    out = save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3), tmp_path / "final")
    (out / META_FILE).write_text(yaml.safe_dump(asdict(_meta(qwen3)) | change))
    with pytest.raises(ConfigError, match=match):
        read_meta(out)


def test_read_meta_names_the_line_of_a_yaml_error(tmp_path):
    (tmp_path / META_FILE).write_text("pattern: causal\nblock_size: [4\n")
    with pytest.raises(ConfigError, match=r"dlm\.yaml.*invalid YAML at line 3, column 1"):
        read_meta(tmp_path)


def test_state_dict_argument_is_what_gets_saved(qwen3, tmp_path):
    """The FSDP path: the gathered weights passed in win over the model's own (here: zeroed embeddings)."""
    state = {k: v.clone() for k, v in qwen3.model.state_dict().items()}
    state["model.embed_tokens.weight"].zero_()
    out = save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3), tmp_path / "final", state_dict=state)
    loaded, _ = load_checkpoint(out)
    assert not loaded.model.model.embed_tokens.weight.any()
    assert qwen3.model.model.embed_tokens.weight.any()  # the live model is untouched


def test_load_checkpoint_round_trip_gives_the_same_logits(backbone, tmp_path):
    meta = _meta(backbone, pattern="block_clean", block_size=4)
    out = save_checkpoint(backbone.model, backbone.tokenizer, meta, tmp_path / "final")
    loaded, loaded_meta = load_checkpoint(out)
    assert loaded_meta == meta
    assert loaded.mask_token_id == backbone.mask_token_id == loaded.tokenizer.mask_token_id
    assert type(loaded.model) is type(backbone.model)
    ids = torch.randint(5, 300, (2, 16))
    assert_close(_logits(loaded.model, ids), _logits(backbone.model, ids))


def test_checkpoint_loads_with_plain_transformers(qwen3, tmp_path):
    out = save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3), tmp_path / "final")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(5, 300, (1, 8))
    assert_close(_logits(plain, ids, "block", 8), _logits(qwen3.model, ids, "block", 8))


def test_load_checkpoint_dtype(qwen3, tmp_path):
    out = save_checkpoint(qwen3.model, qwen3.tokenizer, _meta(qwen3), tmp_path / "final")
    loaded, _ = load_checkpoint(out, dtype="float64")
    assert loaded.model.dtype == torch.float64


def test_read_meta_without_dlm_yaml_or_config_is_one_line(qwen3, tmp_path):
    (tmp_path / "weights.txt").write_text("not a model")  # neither a dlm checkpoint nor an HF folder
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^checkpoint='{where}': no dlm.yaml and no config.json") as err:
        read_meta(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no dlm.yaml"):
        load_checkpoint(tmp_path)


def test_a_missing_path_under_an_existing_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ConfigError, match=r"^checkpoint='outputs/final': no such folder or file"):
        read_meta("outputs/final")


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_a_hub_id_is_a_plain_model(hub_id):
    assert read_meta(hub_id, quiet=True).pattern == "causal"


def test_plain_hf_folder_is_a_causal_checkpoint(qwen3, tmp_path, capsys):
    qwen3.model.save_pretrained(tmp_path)
    qwen3.tokenizer.save_pretrained(tmp_path)
    meta = read_meta(tmp_path)
    assert (meta.pattern, meta.mask_token_id, meta.source) == ("causal", None, str(tmp_path))
    assert capsys.readouterr().err.count("used as a plain causal LM") == 1
    loaded, meta = load_checkpoint(tmp_path)
    assert meta.pattern == "causal" and loaded.tokenizer.mask_token == "<|mask|>"


def test_read_meta_with_an_unknown_field_is_one_line(tmp_path):
    fields = asdict(CheckpointMeta("block", 4, "<|mask|>", 3)) | {"blok_size": 4}
    (tmp_path / META_FILE).write_text(yaml.safe_dump(fields))
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^checkpoint='{where}': dlm.yaml blok_size: unknown key; allowed: pattern, "
                                          r"block_size") as err:
        read_meta(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "pattern: block\n"])
def test_read_meta_with_missing_fields_is_one_line(tmp_path, text):
    (tmp_path / META_FILE).write_text(text)
    with pytest.raises(ConfigError, match=r"dlm.yaml (pattern|block_size): required$") as err:
        read_meta(tmp_path)
    assert "\n" not in str(err.value)


def test_read_meta_fills_optional_fields_with_defaults(tmp_path):
    (tmp_path / META_FILE).write_text("pattern: causal\nblock_size: 4\nmask_token: <|mask|>\nmask_token_id: 1\n")
    assert read_meta(tmp_path) == CheckpointMeta("causal", 4, "<|mask|>", 1, shift=False, source_experiment="")


def test_meta_from_config_takes_pattern_block_size_mask_token_shift_and_name():
    cfg = load_config("experiments/tiny.yaml", overrides=["name=conv", "attention.block_size=8", "objective.shift=true",
                                                          "model.mask_token=<|m|>", "model.name_or_path=org/ar-model"])
    assert CheckpointMeta.from_config(cfg, 7) == CheckpointMeta("block_clean", 8, "<|m|>", 7, True, "conv",
                                                                "org/ar-model")  # a hub id, as given
    ar = load_config("experiments/tiny_ar.yaml")
    assert CheckpointMeta.from_config(ar, 2) == CheckpointMeta("causal", 4, "<|mask|>", 2, False, "tiny_ar")


def test_meta_records_the_clean_context_and_speculative_decoding_needs_the_causal_one():
    cfg = load_config("experiments/tiny.yaml", overrides=["attention.clean_context=causal", "objective.ar_weight=1"])
    meta = CheckpointMeta.from_config(cfg, 7)
    assert meta.clean_context == "causal"
    meta.check_decode_mode("speculative")
    block = CheckpointMeta.from_config(load_config("experiments/tiny.yaml"), 7)
    assert block.clean_context == "block"
    block.check_decode_mode("diffusion")
    with pytest.raises(ConfigError, match=r"^decode.mode='speculative': needs a checkpoint trained with "
                                          r"attention.clean_context=causal \(this one: pattern block_clean, "
                                          r"clean_context block\); allowed: diffusion, ar$"):
        block.check_decode_mode("speculative")
