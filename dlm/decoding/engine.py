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

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from dlm.tensor.attention import additive_mask, block_causal
from dlm.settings.experiment import ConfigError

POLICIES = ("threshold", "factor")
MASK_IMPLEMENTATIONS = ("sdpa", "eager")
"""HF attention implementations that take the dense 4-D mask the decoder builds."""


@dataclass
class DecodeConfig:
    """Knobs of the parallel decoder; validated on construction (`decode.<field>` in errors)."""

    block_size: int = 32
    """Tokens decoded per block; eval block 16-32 in the paper (may differ from the training block)."""
    threshold: float = 0.9
    """Commit every masked position whose confidence >= threshold (Fast-dLLM; paper: 0.9). In (0, 1]."""
    max_new_tokens: int = 256
    """Length limit; the last block is cut short when it is not a multiple of `block_size`."""
    sub_block_size: int | None = None
    """Fast-dLLM v2 (8): only the first incomplete sub-block may commit. Must divide `block_size`."""
    temperature: float = 0.0
    """0: greedy argmax, confidence = max prob. >0: sample, confidence = prob of the sampled token."""
    top_p: float = 1.0
    """Nucleus mass kept when sampling. In (0, 1]."""
    policy: str = "threshold"
    """threshold | factor (Fast-dLLM: commit the largest n with (n + 1) * (1 - c_n) < factor)."""
    factor: float = 1.0
    """The factor policy's budget; larger commits more per pass."""
    one_token_per_forward: bool = False
    """The non-parallel reference: commit exactly the single most confident position per pass."""
    use_cache: bool = True
    """False: every pass forwards the whole sequence (slow, exact same tokens; a correctness reference)."""
    shift: bool = False
    """Dream-style checkpoints: the logit at i-1 predicts token i (must match training's `objective.shift`)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.block_size, int) and self.block_size > 0, "block_size", self.block_size, "must be a positive integer")
        _check(0 < self.threshold <= 1, "threshold", self.threshold, "must be in (0, 1]")
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be a positive integer")
        if self.sub_block_size is not None:
            divisors = [d for d in range(1, self.block_size + 1) if self.block_size % d == 0]
            _check(self.sub_block_size in divisors, "sub_block_size", self.sub_block_size,
                   f"must divide decode.block_size={self.block_size}; allowed: {', '.join(map(str, divisors))}")
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.policy in POLICIES, "policy", self.policy, f"unknown policy; allowed: {', '.join(POLICIES)}")
        _check(self.factor > 0, "factor", self.factor, "must be > 0")


def _check(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"decode.{key}={value!r}: {rule}")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    """Per row: generated ids, cut after the first EOS (kept) and before the first stop string."""
    nfe: int
    """Decoding forward passes for the whole batch (prefill excluded; AR: one per generated position)."""
    num_generated: list[int]
    """Per row: len(tokens[i])."""

    @property
    def tokens_per_forward(self) -> float:
        """TPF: mean generated tokens per row / nfe (AR decoding of one row gives 1.0)."""
        if self.nfe == 0:
            return 0.0
        return sum(self.num_generated) / len(self.num_generated) / self.nfe


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


def _propose(logits: Tensor, cfg: DecodeConfig, mask_token_id: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """A token and its confidence for every position of `logits` `(B, L, V)`; both `(B, L)`."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits.clone()
    logits[..., mask_token_id] = -torch.inf  # [MASK] is never a decoded token
    if cfg.temperature == 0:
        conf, tokens = logits.softmax(dim=-1).max(dim=-1)
        return tokens, conf
    probs = _top_p(torch.softmax(logits / cfg.temperature, dim=-1), cfg.top_p)
    tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def _top_p(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`; renormalise."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before it already reaches top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def _candidates(masked: Tensor, sub_block_size: int | None) -> Tensor:
    """`(B, L)` bool: masked positions allowed to commit (Fast-dLLM v2: first incomplete sub-block only)."""
    if sub_block_size is None:
        return masked
    idx = torch.arange(masked.shape[1], device=masked.device)
    first = masked.int().argmax(dim=1, keepdim=True)  # first masked position per row
    return masked & (idx[None, :] // sub_block_size == first // sub_block_size)


def _choose(conf: Tensor, cand: Tensor, finished: Tensor, cfg: DecodeConfig) -> Tensor:
    """`(B, L)` bool: the positions to commit this pass, the top-n candidates by confidence per row."""
    sorted_conf, order = conf.masked_fill(~cand, -1.0).sort(dim=-1, descending=True, stable=True)
    n_cand = cand.sum(dim=-1)
    if cfg.one_token_per_forward:
        n = torch.ones_like(n_cand)
    elif cfg.policy == "threshold":
        n = (sorted_conf >= cfg.threshold).sum(dim=-1)
    else:  # factor: c_n falls while 1 - factor / (n + 1) rises, so the rule holds on a prefix
        rank = torch.arange(1, conf.shape[1] + 1, device=conf.device)
        n = ((rank + 1) * (1 - sorted_conf) < cfg.factor).long().cumprod(dim=-1).sum(dim=-1)
    n = torch.where(finished, n_cand, n.clamp(min=1))  # finished rows are ignored: fill them at once
    rank_of = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return cand & (rank_of < n.clamp(max=n_cand)[:, None])


def _denoise_block(run: _Runner, seq: Tensor, span: tuple[int, int, int], prev: Tensor | None, finished: Tensor,
                   cfg: DecodeConfig, mask_token_id: int, generator: torch.Generator | None) -> tuple[int, Tensor | None]:
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
        tokens, conf = _propose(block_logits, cfg, mask_token_id, generator)
        chosen = _choose(conf, _candidates(masked, cfg.sub_block_size), finished, cfg)
        seq[:, start:end] = torch.where(chosen, tokens, seq[:, start:end])
        masked &= ~chosen
        passes += 1
    return passes, prev


class _Stopper:
    """Which rows have finished: EOS inside a completed block, or a stop string in the decoded text."""

    def __init__(self, eos_token_id: int | Sequence[int] | None, stop: Sequence[str] | None, tokenizer, device):
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = torch.tensor(ids, dtype=torch.long, device=device)
        self.stop, self.tokenizer = list(stop or []), tokenizer

    def update(self, finished: Tensor, generated: Tensor) -> Tensor:
        """`generated` `(B, N)`: everything decoded so far; returns the new `finished` `(B,)`."""
        finished = finished | torch.isin(generated, self.eos).any(dim=1)
        if self.stop:  # text check, once per block, only where stop strings were asked for
            texts = self.tokenizer.batch_decode(generated.tolist())
            finished = finished | torch.tensor([any(s in t for s in self.stop) for t in texts], device=finished.device)
        return finished

    def truncate(self, tokens: list[int]) -> list[int]:
        """Cut after the first EOS (kept), then before the token where the first stop string starts."""
        eos = set(self.eos.tolist())
        tokens = tokens[: next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]
        return self._cut_stop(tokens) if self.stop else tokens

    def _cut_stop(self, tokens: list[int]) -> list[int]:
        decode = self.tokenizer.decode
        has_stop = lambda n: any(s in decode(tokens[:n]) for s in self.stop)  # noqa: E731
        first = bisect.bisect_left(range(len(tokens) + 1), True, key=has_stop)  # fewest tokens showing a stop
        if first > len(tokens):
            return tokens
        text = decode(tokens[:first])
        head = text[: min(text.find(s) for s in self.stop if s in text)]
        n = first - 1  # a stop string may span tokens: drop back until no part of it is left
        while n > 0 and not head.startswith(decode(tokens[:n])):
            n -= 1
        return tokens[:n]

    def output(self, generated: Tensor, nfe: int) -> GenerationOutput:
        tokens = [self.truncate(row) for row in generated.tolist()]
        return GenerationOutput(tokens=tokens, nfe=nfe, num_generated=[len(t) for t in tokens])


def _check_inputs(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                  stop: Sequence[str] | None, tokenizer) -> None:
    """One-line errors for inputs the decoder cannot serve, before any forward."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ConfigError(f"input_ids{tuple(input_ids.shape)}: must be (batch, prompt_length) with an attention_mask of the same shape")
    if not bool((attention_mask.diff(dim=1) >= 0).all() and attention_mask[:, -1].all()):
        raise ConfigError("attention_mask: prompts must be left-padded (pads first) with at least one real token per row")
    longest = int(attention_mask.sum(dim=1).max())
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"decode.max_new_tokens={max_new_tokens}: prompt length {longest} + {max_new_tokens} = "
                          f"{longest + max_new_tokens} exceeds model.config.max_position_embeddings={limit}")
    if stop and tokenizer is None:
        raise ConfigError(f"stop={list(stop)!r}: stop strings need the tokenizer (tokenizer=...)")


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
    _check_inputs(model, input_ids, attention_mask, cfg.max_new_tokens, stop, tokenizer)
    stopper = _Stopper(eos_token_id, stop, tokenizer, input_ids.device)
    with torch.inference_mode():
        generated, nfe = _decode(model, input_ids, attention_mask, cfg, mask_token_id, stopper, generator)
    return stopper.output(generated, nfe)


def _decode(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, cfg: DecodeConfig, mask_token_id: int,
            stopper: _Stopper, generator: torch.Generator | None) -> tuple[Tensor, int]:
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


def ar_generate(model: PreTrainedModel, input_ids: Tensor, *, attention_mask: Tensor | None = None, max_new_tokens: int,
                eos_token_id: int | Sequence[int] | None = None, stop: Sequence[str] | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None) -> GenerationOutput:
    """The AR baseline: transformers' own greedy `generate` with its KV cache under the causal mask.

    Same inputs and output as :func:`generate`; `nfe` is the number of decode steps (one token each).
    `eos_token_id=None` means no EOS stop here too (not the model's `generation_config` EOS).
    """
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    _check(isinstance(max_new_tokens, int) and max_new_tokens > 0, "max_new_tokens", max_new_tokens, "must be a positive integer")
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, stop, tokenizer)
    stopper = _Stopper(eos_token_id, stop, tokenizer, input_ids.device)
    eos = stopper.eos.tolist()
    pad = eos[0] if eos else (model.generation_config.pad_token_id or 0)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, eos_token_id=eos, pad_token_id=pad,
                             stop_strings=list(stop) if stop else None, tokenizer=tokenizer)
    generated = out[:, input_ids.shape[1]:]
    return stopper.output(generated, nfe=generated.shape[1])
