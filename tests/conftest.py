"""Shared fixtures: an offline tokenizer and real tiny HF models (Qwen3, Llama) built from configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from dlm.backbone import Backbone, build_model, ensure_mask_token  # noqa: E402
from dlm.config import ModelConfig  # noqa: E402
from dlm.tokenizer import tiny_tokenizer  # noqa: E402

TINY = {
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(out_dir=path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_backbone(arch: str, tokenizer, *, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, config=TINY[arch])
    model = build_model(cfg, tokenizer, attn_implementation=attn_implementation, dtype=dtype).eval()
    return Backbone(model, tokenizer, ensure_mask_token(model, tokenizer, cfg.mask_token))


@pytest.fixture(params=["qwen3", "llama"])
def backbone(request, tokenizer) -> Backbone:
    return make_backbone(request.param, tokenizer)


@pytest.fixture
def qwen3(tokenizer) -> Backbone:
    return make_backbone("qwen3", tokenizer)
