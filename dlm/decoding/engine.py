"""KV-cached parallel decoding for block-diffusion LMs (Fast-dLLM, Efficient-DLM), and the AR baseline.

A model trained with the `block` / `block_clean` patterns attends block-causally, so the keys and values
of finished blocks never change: prefill the prompt once, then decode one block at a time against the
cache (DESIGN.md §1 "Decoding"). Each block starts as [MASK] tokens; every forward pass commits the
masked positions the model is confident about (at least one), until the block is complete.

Layout. Prompts are left-padded, so every row starts generating at index P. Each row's tokens get the
positions and block ids they would have alone: real prompt tokens are at positions 0..p_len-1 (block
pos // block_size); generated block g sits at block ceil(p_len / block_size) + g, positions p_len + ...
Hence batched decoding gives the same tokens as one prompt at a time (Fast-dLLM issue #39).

Accounting. `nfe` counts the model forwards that decode (one per denoising pass), not the prefill: the
completed block's KV is appended inside the next block's first pass, so cached and uncached decoding
make the same number of forwards. A length limit that is not a multiple of `block_size` cuts the last
block short, so no forward is spent on tokens that would be dropped. EOS is kept in the output (as
`transformers` does); tokens after it are dropped. A stop string is cut off together with the token that
starts it, so the decoded text holds no part of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from dlm.decoding.output import GenerationOutput
from dlm.decoding.policies import candidates, choose, propose
from dlm.decoding.stopping import Stopper, check_inputs
from dlm.settings.decode import DecodeConfig
from dlm.settings.errors import ConfigError
from dlm.tensor.attention import additive_mask, block_causal

MASK_IMPLEMENTATIONS = ("sdpa", "eager")
"""HF attention implementations that take the dense 4-D mask the decoder builds."""


@dataclass
class _Layout:
    """Per-row positions, block ids and realness of the whole planned sequence `(B, P + max_new_tokens)`."""

    position_ids: Tensor  # (B, T) long
    block_ids: Tensor  # (B, T) long
    real: Tensor  # (B, T) bool, False = left padding
    prompt_len: int  # P, the padded prompt length; generation starts here in every row

    def mask(self, start: int, end: int) -> Tensor:
        """`(B, 1, end - start, end)` bool: queries `start:end` over keys `:end` (cache + input).

        A real query sees real keys of its own or earlier blocks; a pad query sees only itself, so no
        softmax row is empty (NaN) and pads never leak into real tokens.
        """
        q_real = self.real[:, start:end, None]
        sees = block_causal(self.block_ids[:, start:end, None], self.block_ids[:, None, :end])
        sees = sees & self.real[:, None, :end]
        q = torch.arange(start, end, device=self.real.device)
        itself = q[:, None] == torch.arange(end, device=self.real.device)[None, :]
        return torch.where(q_real, sees, itself)[:, None]


def _layout(attention_mask: Tensor, max_new_tokens: int, block_size: int) -> _Layout:
    real = attention_mask.bool()
    prompt_len = real.sum(dim=1, keepdim=True)  # (B, 1)
    prompt_pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding: 0..p_len-1, pads 0
    offset = torch.arange(max_new_tokens, device=real.device)[None, :]
    gen_pos = prompt_len + offset
    gen_block = -(-prompt_len // block_size) + offset // block_size  # ceil(p_len / block_size) + g
    return _Layout(
        position_ids=torch.cat([prompt_pos, gen_pos], dim=1),
        block_ids=torch.cat([prompt_pos // block_size, gen_block], dim=1),
        real=torch.cat([real, torch.ones_like(gen_pos, dtype=torch.bool)], dim=1),
        prompt_len=real.shape[1],
    )


class _Runner:
    """Model forwards over a slice of the sequence, against the KV cache when there is one."""

    def __init__(self, model: PreTrainedModel, layout: _Layout, use_cache: bool):
        self.model, self.layout = model, layout
        self.eager = model.config._attn_implementation == "eager"
        self.cache = DynamicCache(config=model.config) if use_cache else None

    def __call__(self, seq: Tensor, start: int, end: int, keep: int) -> Tensor:
        """Logits `(B, keep, V)` of the last `keep` tokens of `seq[:, start:end]`; the cache must hold `:start`."""
        mask = self.layout.mask(start, end)
        if self.eager:
            mask = additive_mask(mask, self.model.dtype)
        out = self.model(
            input_ids=seq[:, start:end],
            attention_mask=mask,
            position_ids=self.layout.position_ids[:, start:end],
            cache=self.cache,
            use_cache=self.cache is not None,
            logits_to_keep=keep,
        )
        return out.logits

    def keep_until(self, end: int) -> int:
        """Drop cached KV past `end` (repeated passes must not append); where the next input starts."""
        if self.cache is None:
            return 0  # no cache: every pass forwards the whole sequence
        self.cache.crop(end - self.cache.get_seq_length())  # this transformers crops by a negative count
        return end


def _denoise_block(run: _Runner, seq: Tensor, span: tuple[int, int, int], prev: Tensor | None, finished: Tensor,
                   cfg: DecodeConfig, mask_token_id: int,
                   generator: torch.Generator | None) -> tuple[int, Tensor | None]:
    """Decode `seq[:, start:end]` in place; the first pass also feeds `seq[:, lo:start]` (the completed
    block whose KV is not cached yet). Returns the passes made and the logit predicting `start` (shift)."""
    lo, start, end = span
    width = end - start
    masked = torch.ones_like(seq[:, start:end], dtype=torch.bool)
    passes = 0
    while masked.any():
        logits = run(seq, lo, end, keep=min(end - lo, width + 1))
        if logits.shape[1] > width:  # the input reaches back past `start`
            prev = logits[:, -width - 1]
        lo = run.keep_until(start)
        block_logits = logits[:, -width:]
        if cfg.shift:  # logit i-1 predicts token i; position 0 from the previous block's last token
            block_logits = torch.cat([prev[:, None], block_logits[:, :-1]], dim=1)
        tokens, conf = propose(block_logits, cfg, mask_token_id, generator)
        chosen = choose(conf, candidates(masked, cfg.sub_block_size), finished, cfg)
        seq[:, start:end] = torch.where(chosen, tokens, seq[:, start:end])
        masked &= ~chosen
        passes += 1
    return passes, prev


def _resolve_config(config: DecodeConfig | None, overrides: dict) -> DecodeConfig:
    fields = [f.name for f in dataclasses.fields(DecodeConfig)]
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"decode.{key}: unknown key; allowed: {', '.join(fields)}")
    return dataclasses.replace(config or DecodeConfig(), **overrides)


def generate(model: PreTrainedModel, input_ids: Tensor, *, mask_token_id: int, attention_mask: Tensor | None = None,
             config: DecodeConfig | None = None, eos_token_id: int | Sequence[int] | None = None,
             stop: Sequence[str] | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
             generator: torch.Generator | None = None, **overrides) -> GenerationOutput:
    """Block-by-block parallel decoding of left-padded prompts `input_ids` `(B, P)`.

    `overrides` are `DecodeConfig` fields (`threshold=0.5`) applied over `config`. `eos_token_id=None`
    means no EOS stop. The model must run sdpa or eager attention: the decoder passes a dense 4-D mask.
    Example: ``generate(model, ids, mask_token_id=mask_id, block_size=16, eos_token_id=tok.eos_token_id)``.
    """
    cfg = _resolve_config(config, overrides)
    impl = model.config._attn_implementation
    if impl not in MASK_IMPLEMENTATIONS:
        raise ConfigError(f"model attn_implementation={impl!r}: decoding passes a dense 4-D mask; load the model with "
                          "attn_implementation='sdpa' (or 'eager') for decoding")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    check_inputs(model, input_ids, attention_mask, cfg.max_new_tokens, stop, tokenizer)
    stopper = Stopper(eos_token_id, stop, tokenizer, input_ids.device)
    with torch.inference_mode():
        generated, nfe = _decode(model, input_ids, attention_mask, cfg, mask_token_id, stopper, generator)
    return stopper.output(generated, nfe)


def _decode(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, cfg: DecodeConfig, mask_token_id: int,
            stopper: Stopper, generator: torch.Generator | None) -> tuple[Tensor, int]:
    """The block loop; returns the generated ids `(B, N)` (whole blocks, before truncation) and the NFE."""
    prompt_len, total = input_ids.shape[1], input_ids.shape[1] + cfg.max_new_tokens
    layout = _layout(attention_mask, cfg.max_new_tokens, cfg.block_size)
    run = _Runner(model, layout, cfg.use_cache)
    seq = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], cfg.max_new_tokens), mask_token_id)], dim=1)
    prev, lo = None, 0
    if run.cache is not None:  # prefill; its last logit predicts the first token under `shift`
        prev, lo = run(seq, 0, prompt_len, keep=1)[:, -1], prompt_len
    finished = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    nfe, start = 0, prompt_len
    while start < total and not finished.all():
        end = min(start + cfg.block_size, total)
        passes, prev = _denoise_block(run, seq, (lo, start, end), prev, finished, cfg, mask_token_id, generator)
        nfe += passes
        finished = stopper.update(finished, seq[:, prompt_len:end])
        lo = start if run.cache is not None else 0  # the completed block enters the cache in the next pass
        start = end
    return seq[:, prompt_len:start], nfe
