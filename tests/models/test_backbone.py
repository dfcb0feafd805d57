from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from dlm.models.backbone import ensure_mask_token, forward_logits, load_backbone
from dlm.settings import PATTERNS, ConfigError, ModelConfig
from dlm.tensor import patterns
from dlm.tensor.attention import build_attention_inputs
from tests.conftest import TINY


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_under_every_pattern(backbone, pattern):
    ids = torch.randint(5, 300, (2, 16 if patterns.get(pattern).two_halves else 8))
    attn = build_attention_inputs(patterns.get(pattern, block_size=4), batch_size=2, seq_len=8)
    logits = forward_logits(backbone.model, ids, attn)
    assert logits.shape == (2, ids.shape[1], backbone.model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_builtin_tokenizer_has_eos_pad_and_mask(tokenizer):
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.mask_token == "<|mask|>"
    text = "Question: Ana has 17 pens.\nAnswer: 17 - 4 = 13\n#### 13"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert "7" in tokenizer.tokenize(" 17")  # digits are split


def test_mask_token_added_grows_embeddings_and_keeps_rows(tokenizer_dir):
    from transformers import AutoTokenizer

    from tests.conftest import make_backbone

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # own copy: the session tokenizer must not change
    model = make_backbone("qwen3", tok).model
    before = model.get_input_embeddings().weight.detach().clone()
    mask_id = ensure_mask_token(model, tok, "<|MASK2|>")
    after = model.get_input_embeddings().weight
    assert mask_id == before.shape[0] and after.shape[0] == before.shape[0] + 1
    assert_close(after[: before.shape[0]], before)


def test_existing_mask_token_is_reused(qwen3):
    rows = qwen3.model.get_input_embeddings().weight.shape[0]
    assert ensure_mask_token(qwen3.model, qwen3.tokenizer, "<|mask|>") == qwen3.mask_token_id
    assert qwen3.model.get_input_embeddings().weight.shape[0] == rows


def test_load_from_local_folder_roundtrip(qwen3, tmp_path):
    qwen3.model.save_pretrained(tmp_path)
    qwen3.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(ModelConfig(name_or_path=str(tmp_path)))
    ids = torch.randint(5, 300, (1, 8))
    attn = build_attention_inputs(patterns.get("block", block_size=4), batch_size=1, seq_len=8)
    with torch.no_grad():
        assert_close(forward_logits(loaded.model, ids, attn), forward_logits(qwen3.model, ids, attn))
    assert loaded.mask_token_id == qwen3.mask_token_id


def test_build_llama_from_config(tokenizer_dir):
    bb = load_backbone(ModelConfig(arch="llama", config=TINY["llama"], tokenizer=str(tokenizer_dir)))
    assert type(bb.model).__name__ == "LlamaForCausalLM"


def test_remote_code_checkpoint_needs_explicit_opt_in(qwen3, tmp_path):
    qwen3.model.save_pretrained(tmp_path)
    qwen3.tokenizer.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "tiny_custom_lm"  # unknown to transformers: only its own code can load it
    cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"set model.trust_remote_code=true"):
        load_backbone(ModelConfig(name_or_path=str(tmp_path)))


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.name_or_path='.*nothing': cannot load") as info:
        load_backbone(ModelConfig(name_or_path=str(tmp_path / "nothing")))
    assert "\n" not in str(info.value)


def test_unknown_arch_is_named():
    with pytest.raises(ConfigError, match="model.arch='qwen9': unknown HF model type"):
        load_backbone(ModelConfig(arch="qwen9", tokenizer="builtin:tiny"))
