"""LoRA through peft: what trains, one-line errors, merged copies and adapter-only folders that load back."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dlm.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from dlm.models.lora import apply_lora, is_adapter_folder, linear_names, merged_copy, parameter_counts
from dlm.settings import ConfigError, LoraConfig
from tests.conftest import make_backbone


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _perturb(model, seed: int = 0) -> None:
    """Stand-in for training: non-zero adapters (peft starts B at 0) and a moved [MASK] row."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def test_only_adapters_and_the_mask_row_train(tokenizer):
    bb = make_backbone("qwen3", tokenizer)
    total_before = sum(p.numel() for p in bb.model.parameters())
    model = apply_lora(bb.model, LoraConfig(enabled=True, rank=4, target_modules=["q_proj", "v_proj"]),
                       bb.mask_token_id)
    names = _trainable(model)
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    assert any("trainable_tokens_delta" in n for n in names)
    trainable, total = parameter_counts(model)
    # 2 layers x (q: 4*(64+64) + v: 4*(64+32)) + one 64-wide [MASK] row
    assert trainable == 2 * (4 * 128 + 4 * 96) + 64
    assert total > total_before


def test_frozen_mask_row_and_trained_lm_head(tokenizer):
    bb = make_backbone("qwen3", tokenizer)
    frozen = apply_lora(bb.model, LoraConfig(enabled=True, train_mask_embedding=False), bb.mask_token_id)
    assert not any("trainable_tokens_delta" in n for n in _trainable(frozen))
    llama = make_backbone("llama", tokenizer)  # untied head: trained in full beside the [MASK] row
    head = apply_lora(llama.model, LoraConfig(enabled=True, train_lm_head=True), llama.mask_token_id)
    assert any("lm_head.modules_to_save" in n for n in _trainable(head))


def test_tied_head_without_mask_row_is_refused(tokenizer):
    bb = make_backbone("qwen3", tokenizer)
    bb.model.config.tie_word_embeddings = True
    with pytest.raises(ConfigError, match=r"^model.lora.train_mask_embedding=false: with tied embeddings"):
        apply_lora(bb.model, LoraConfig(enabled=True, train_lm_head=True, train_mask_embedding=False),
                   bb.mask_token_id)


def test_unknown_target_module_fails_in_one_line_listing_the_real_ones(tokenizer):
    bb = make_backbone("qwen3", tokenizer)
    assert linear_names(bb.model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"^model.lora.target_modules=\['q_proj', 'qkv'\]: qkv not a linear layer "
                                          r"of Qwen3ForCausalLM; allowed: down_proj, gate_proj, .*all-linear$"):
        apply_lora(bb.model, LoraConfig(enabled=True, target_modules=["q_proj", "qkv"]), bb.mask_token_id)


def test_merged_copy_gives_the_adapted_logits_and_leaves_the_adapters(tokenizer):
    bb = make_backbone("qwen3", tokenizer)
    model = apply_lora(bb.model, LoraConfig(enabled=True, rank=4), bb.mask_token_id)
    _perturb(model)
    ids = torch.tensor([[5, bb.mask_token_id, 7, 8, bb.mask_token_id, 9]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = merged_copy(model)
        assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert_close(model(input_ids=ids).logits, expected)  # the training model is untouched
    assert not any("lora_" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("train_mask_embedding", [True, False])
def test_adapter_only_folder_loads_back_to_the_same_logits(tokenizer, tmp_path, train_mask_embedding):
    bb = make_backbone("qwen3", tokenizer)
    base = save_checkpoint(bb.model, tokenizer, CheckpointMeta("causal", 4, "<|mask|>", bb.mask_token_id),
                           tmp_path / "base")
    base_bb, _ = load_checkpoint(base)
    model = apply_lora(base_bb.model, LoraConfig(enabled=True, rank=4, train_mask_embedding=train_mask_embedding),
                       bb.mask_token_id)
    _perturb(model)
    meta = CheckpointMeta("block_clean", 4, "<|mask|>", bb.mask_token_id, base_model=str(base))
    out = save_checkpoint(model, tokenizer, meta, tmp_path / "adapter")
    assert is_adapter_folder(out) and not (out / "model.safetensors").exists()
    ids = torch.tensor([[5, bb.mask_token_id, 7, 8]])
    loaded, loaded_meta = load_checkpoint(out)
    with torch.no_grad():
        assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert loaded_meta.base_model == str(base) and loaded.mask_token_id == bb.mask_token_id


def test_adapter_whose_base_is_gone_fails_in_one_line(tokenizer, tmp_path):
    bb = make_backbone("qwen3", tokenizer)
    base = save_checkpoint(bb.model, tokenizer, CheckpointMeta("causal", 4, "<|mask|>", bb.mask_token_id),
                           tmp_path / "base")
    model = apply_lora(load_checkpoint(base)[0].model, LoraConfig(enabled=True), bb.mask_token_id)
    meta = CheckpointMeta("block_clean", 4, "<|mask|>", bb.mask_token_id, base_model=str(tmp_path / "gone"))
    out = save_checkpoint(model, tokenizer, meta, tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"adapter-only, and its base model .*gone' does not load") as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value)
