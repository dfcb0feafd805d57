"""Which masked positions a denoising pass commits: the proposal (greedy or nucleus sampling) and
the commit rules (confidence threshold, Fast-dLLM's factor rule, one token per forward,
sub-blocks)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dlm.settings.decode import DecodeConfig


def propose(logits: Tensor, cfg: DecodeConfig, mask_token_id: int,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """A token and its confidence for every position of `logits` `(B, L, V)`; both `(B, L)`."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = without_mask(logits, mask_token_id)
    if cfg.temperature == 0:
        conf, tokens = logits.softmax(dim=-1).max(dim=-1)
        return tokens, conf
    probs = top_p_filter(torch.softmax(logits / cfg.temperature, dim=-1), cfg.top_p)
    tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def without_mask(logits: Tensor, mask_token_id: int) -> Tensor:
    """`logits` `(..., V)` with [MASK] at -inf (a converted model's [MASK] is never an output), as a
    new tensor: one `masked_fill`, the caller's logits untouched."""
    return logits.masked_fill(_is_mask(logits.shape[-1], mask_token_id, logits.device), -torch.inf)


@functools.lru_cache(maxsize=8)
def _is_mask(vocab: int, mask_token_id: int, device: torch.device) -> Tensor:
    """`(V,)` bool, True at [MASK]: made once per vocabulary and device."""
    return torch.arange(vocab, device=device) == mask_token_id


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`; renormalise."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # mass before it already reaches top_p
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def candidates(masked: Tensor, sub_block_size: int | None) -> Tensor:
    """`(B, L)` bool: masked positions allowed to commit (Fast-dLLM v2: first incomplete sub-block
    only)."""
    if sub_block_size is None:
        return masked
    idx = torch.arange(masked.shape[1], device=masked.device)
    first = masked.int().argmax(dim=1, keepdim=True)  # first masked position per row
    return masked & (idx[None, :] // sub_block_size == first // sub_block_size)


def choose(conf: Tensor, cand: Tensor | None, cfg: DecodeConfig) -> Tensor:
    """`(B, L)` bool: the positions to commit this pass, the top-n candidates by confidence per row
    (`cand` None: every position is one, as on a block's first pass)."""
    if cfg.policy == "threshold":
        return _above_threshold(conf, cand, cfg.threshold)
    cand = torch.ones_like(conf, dtype=torch.bool) if cand is None else cand
    sorted_conf, order = conf.masked_fill(~cand, -1.0).sort(dim=-1, descending=True, stable=True)
    n_cand = cand.sum(dim=-1)
    if cfg.policy == "fixed":
        n = torch.full_like(n_cand, cfg.tokens_per_pass)
    else:  # factor: c_n falls while 1 - factor / (n + 1) rises, so the rule holds on a prefix
        rank = torch.arange(1, conf.shape[1] + 1, device=conf.device)
        n = ((rank + 1) * (1 - sorted_conf) < cfg.factor).long().cumprod(dim=-1).sum(dim=-1)
    n = n.clamp(min=1)
    ranks = torch.arange(conf.shape[1], device=conf.device).expand_as(order)
    rank_of = torch.empty_like(order).scatter_(1, order, ranks)
    return cand & (rank_of < n.clamp(max=n_cand)[:, None])


def _above_threshold(conf: Tensor, cand: Tensor | None, threshold: float) -> Tensor:
    """The threshold rule without a sort (it runs every pass: at most five ops, not a sort's
    fifteen): every candidate at or above `threshold`, and at least the most confident one (the
    first on ties, as the stable sort's top-1)."""
    score = conf if cand is None else torch.where(cand, conf, -1.0)
    chosen = (score >= threshold).scatter_(1, score.argmax(dim=1, keepdim=True), True)
    return chosen if cand is None else chosen & cand
