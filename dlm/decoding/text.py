"""Text in, text out: load a dlm checkpoint and complete prompts with the parallel decoder (or AR).

Shared by `dlm generate` and anything else that starts from strings rather than token ids.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from dlm.data.chat import ChatFormat, chat_format_of
from dlm.decoding.engine import generate
from dlm.decoding.output import GenerationOutput
from dlm.models.backbone import Backbone
from dlm.models.checkpoint import CheckpointMeta, load_checkpoint
from dlm.models.device import resolve_device
from dlm.settings import DecodeConfig


@dataclass
class Completions:
    texts: list[str]
    output: GenerationOutput
    seconds: float

    @property
    def tokens_per_sec(self) -> float:
        return sum(self.output.num_generated) / max(self.seconds, 1e-9)


def decode_config_for(meta: CheckpointMeta, **overrides) -> DecodeConfig:
    """Decoder settings that match how the checkpoint was trained (block size, shift), then
    overrides."""
    base = DecodeConfig(block_size=meta.block_size, shift=meta.shift)
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    meta.check_decode_mode(cfg.mode)
    return cfg


def chat_format_for(meta: CheckpointMeta, tokenizer: PreTrainedTokenizerBase,
                    chat: bool | None = None, *, key: str = "--chat") -> ChatFormat | None:
    """How prompts are rendered: the template the checkpoint was trained with (dlm.yaml
    `chat_template`) unless `chat` is False; `chat=True` on a checkpoint without one uses the
    tokenizer's own (an instruct AR model)."""
    if chat is False:
        return None
    if meta.chat_template:
        return ChatFormat(meta.chat_template, meta.system_prompt)
    return chat_format_of(tokenizer, key=key) if chat else None


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   chat: ChatFormat | None) -> list[str]:
    return list(prompts) if chat is None else [chat.prompt(tokenizer, p) for p in prompts]


def encode_prompts(backbone: Backbone, prompts: list[str],
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `(input_ids, attention_mask)` of `prompts` (see `encode_texts`)."""
    return encode_texts(backbone.tokenizer, prompts, device)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `(input_ids, attention_mask)`; ids without special tokens, as the training data
    is tokenized (`dlm.data.sources`)."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return left_pad(rows, pad_token_id(tokenizer), device)


def left_pad(rows: list[list[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both `(B, P)` long, 0 = pad: every row then starts generating
    at the same index."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, else EOS (masked out anyway), else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def complete(backbone: Backbone, meta: CheckpointMeta, prompts: list[str], decode: DecodeConfig, *,
             ar: bool = False, stop: list[str] | None = None,
             chat: ChatFormat | None = None) -> Completions:
    """Complete `prompts` in one batch (rendered through `chat` when given); `ar=True` (or a causal
    checkpoint) decodes in the engine's AR mode."""
    device = next(backbone.model.parameters()).device
    rendered = render_prompts(backbone.tokenizer, prompts, chat)
    ids, attention = encode_prompts(backbone, rendered, device)
    tok = backbone.tokenizer
    start = time.perf_counter()
    if ar or meta.attention_pattern.autoregressive:
        decode = dataclasses.replace(decode, mode="ar")
    out = generate(backbone.model, ids, attention_mask=attention,
                   mask_token_id=backbone.mask_token_id, config=decode,
                   eos_token_id=tok.eos_token_id, stop=stop, tokenizer=tok,
                   pattern=meta.attention_pattern)
    seconds = time.perf_counter() - start
    texts = tok.batch_decode(out.tokens, skip_special_tokens=True)
    return Completions(texts, out, seconds)


def load_for_decoding(path: str | Path, *, device: str = "auto",
                      dtype: str = "float32") -> tuple[Backbone, CheckpointMeta]:
    """A checkpoint on `device` (auto: CUDA when present) in eval mode, with sdpa attention for the
    decoder."""
    # an absent device fails before the weights load
    target = resolve_device(device)
    backbone, meta = load_checkpoint(path, attn_implementation="sdpa", dtype=dtype)
    backbone.model.to(target).eval()
    return backbone, meta
