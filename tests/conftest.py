"""Shared fixtures: an offline tokenizer, real tiny HF models (Qwen3, Llama) built from configs, tiny
checkpoints on disk, and one torch thread for modules of many tiny forwards."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from dlm.models.backbone import Backbone, build_model, ensure_mask_token  # noqa: E402
from dlm.models.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402
from dlm.models.tokenizer import tiny_tokenizer  # noqa: E402
from dlm.settings import ModelConfig  # noqa: E402

TINY = {
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
}
SHARPEN = 30.0
"""lm_head scale: a random tiny model is near-uniform over 384 tokens (max prob ~0.004) and would emit EOS
first; x30 gives confidences of 0.1-0.6, so a threshold of 0.3 makes some passes commit several tokens and
some one."""


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(out_dir=path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_backbone(arch: str, tokenizer, *, attn_implementation: str = "sdpa", dtype=torch.float32,
                  seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, config=TINY[arch])
    model = build_model(cfg, tokenizer, attn_implementation=attn_implementation, dtype=dtype).eval()
    return Backbone(model, tokenizer, ensure_mask_token(model, tokenizer, cfg.mask_token))


def sharp_backbone(arch: str, tokenizer, *, dtype=torch.float64, **kwargs) -> Backbone:
    """`make_backbone` with the lm_head sharpened (see SHARPEN); float64 by default, so that near-ties
    and padding noise cannot flip an argmax between two paths (batched vs single, cached vs not)."""
    bb = make_backbone(arch, tokenizer, dtype=dtype, **kwargs)
    with torch.no_grad():
        bb.model.lm_head.weight.mul_(SHARPEN)
    return bb


def save_tiny(backbone: Backbone, path: Path, pattern: str = "block_clean") -> Path:
    """`backbone` as a dlm checkpoint folder (HF model, tokenizer, dlm.yaml with block size 4)."""
    meta = CheckpointMeta(pattern, 4, "<|mask|>", backbone.mask_token_id)
    return save_checkpoint(backbone.model, backbone.tokenizer, meta, path)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Many tiny forwards: one thread is faster, and OpenMP threads spin-waiting on the shared 2-core
    machine made every pass ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """`one_torch_thread` for a whole module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with one_torch_thread():
        yield


@pytest.fixture(params=["qwen3", "llama"])
def backbone(request, tokenizer) -> Backbone:
    return make_backbone(request.param, tokenizer)


@pytest.fixture
def qwen3(tokenizer) -> Backbone:
    return make_backbone("qwen3", tokenizer)


@pytest.fixture(scope="session")
def ar_checkpoint(tmp_path_factory) -> Path:
    """A random tiny AR checkpoint (the SMALL_MODEL shape), what experiments/tiny.yaml converts."""
    from tests.helpers import save_tiny_ar

    return save_tiny_ar(tmp_path_factory.getbasetemp() / "tiny_ar")
