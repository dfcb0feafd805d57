"""Lossless self-speculative decoding: the diffusion path drafts, the causal path of the same network verifies.

A checkpoint trained with `attention.clean_context: causal` (and the joint objective) has a clean half that is
a causal LM, so its clean KV cache is exactly an AR model's cache (the token-causal layout, as the lean AR
mode uses). With the cache holding `:pos` and the next token `g` at `pos` known, two forms:

- separate (two forwards a step): a draft forward of `[g, MASK x k]` at `pos..pos+k`, bidirectional among
  themselves over the cache (the noisy block of training), gives the drafts `d_1..d_k` (the cache is cropped
  back to `pos`); a causal forward of `[g, d_1..d_k]` gives the causal greedy tokens `v_1..v_{k+1}`.
- fused (one forward a step, Nemotron-Labs-Diffusion's form): `[g, d_1..d_k]` causally, followed by a noisy
  block of `k + 1` [MASK]s at `pos+k+1..` that sees the cache, `g`, the drafts and itself. The causal rows
  verify; the noisy rows are the next draft, kept only when every draft was accepted (it was conditioned on
  them), for the positions after the causal path's next token. After a rejection the next step has no drafts:
  `[g]` and a fresh noisy block.

Either way the step accepts the longest prefix with `d_j == v_j` (n drafts) plus the causal path's next token
`v_{n+1}` (:func:`accept`), and crops the cache to what was accepted. Every committed token is the causal
greedy argmax given the committed prefix, so the output equals the AR mode's token for token; a draft that is
all wrong still gains one token per verify, one that is all right gains k + 1. Batched rows accept the same
count per step: the minimum over the rows still decoding (each row may have agreed on more; committing the
common prefix is still exact). `nfe` counts the prefill (whose last logit gives the first token, as in the AR
mode's count) and every forward of every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.decoding.batch import ActiveRows
from dlm.decoding.runner import Runner
from dlm.decoding.stopping import Stopper
from dlm.tensor.attention import additive_mask


def accepted_counts(draft: Tensor, verified: Tensor) -> Tensor:
    """`(B,)`: per row, the drafts `draft` `(B, k)` that match the causal greedy tokens `verified[:, :k]`
    as a prefix (`verified` `(B, k + 1)`: the causal argmax at each verify input)."""
    return (draft == verified[:, :-1]).long().cumprod(dim=1).sum(dim=1)


def accept(draft: Tensor, verified: Tensor) -> tuple[int, Tensor]:
    """(n, tokens `(B, n + 1)`): the n drafts every row's causal path agrees with (the minimum over rows),
    then the causal path's own next token. n = 0 (all wrong) still gives one token; n = k gives k + 1."""
    n = int(accepted_counts(draft, verified).min())
    return n, torch.cat([draft[:, :n], verified[:, n:n + 1]], dim=1)


def _argmax(logits: Tensor, exclude: int) -> Tensor:
    logits = logits.clone()
    logits[..., exclude] = -torch.inf  # a converted model's [MASK] is never an output
    return logits.argmax(dim=-1)


def _mask(run: Runner, start: int, end: int, noisy: int) -> Tensor:
    """Queries `start:end` over the cache: causal, except that the last `noisy` inputs (a draft block) also
    see each other."""
    keys = run.layout.total if run.static else end
    mask = run.layout.mask(start, end, keys)
    if noisy:
        k = torch.arange(keys, device=mask.device)
        block = ((k >= end - noisy) & (k < end))[None, None, None, :]
        q_noisy = (torch.arange(start, end, device=mask.device) >= end - noisy)[None, None, :, None]
        mask = mask | (block & q_noisy)
    return additive_mask(mask, run.model.dtype) if run.eager else mask


def _forward(run: Runner, seq: Tensor, start: int, end: int, keep: int | Tensor, *, noisy: int = 0) -> Tensor:
    out = run.step(input_ids=seq[:, start:end], attention_mask=_mask(run, start, end, noisy),
                   position_ids=run.layout.position_ids[:, start:end], cache=run.cache, use_cache=True,
                   logits_to_keep=keep)
    run.length = end
    return out.logits


def draft_tokens(run: Runner, seq: Tensor, pos: int, k: int, mask_token_id: int, shift: bool = False) -> Tensor:
    """`(B, k)`: the diffusion path's one-pass guesses for `pos+1..pos+k` (`seq[:, pos]` known, cache `:pos`)."""
    seq[:, pos + 1:pos + k + 1] = mask_token_id
    logits = _forward(run, seq, pos, pos + k + 1, k + shift, noisy=k + 1)
    run.keep_until(pos)  # the draft's KV is not the causal one: drop it
    return _argmax(logits[:, :k], mask_token_id)


def _step(run: Runner, rows: ActiveRows, pos: int, k: int, mask_token_id: int, shift: bool) -> int:
    """One draft + verify; writes the n accepted drafts and the causal next token after `pos`; returns n."""
    draft = draft_tokens(run, rows.seq, pos, k, mask_token_id, shift)
    rows.count_forward()
    rows.seq[:, pos + 1:pos + k + 1] = draft
    logits = _forward(run, rows.seq, pos, pos + k + 1, k + 1)
    rows.count_forward()
    n, tokens = accept(draft, _argmax(logits, mask_token_id))
    rows.seq[:, pos + 1:pos + n + 2] = tokens
    run.keep_until(pos + n + 1)  # cache: g and the n accepted drafts
    return n


def fused_step(run: Runner, rows: ActiveRows, pos: int, draft: Tensor, width: int, mask_token_id: int,
               shift: bool) -> tuple[int, Tensor]:
    """One forward: verify `draft` `(B, k)` for `pos+1..pos+k` and draft the `width - 1` tokens after the
    causal next token with a noisy block of `width` [MASK]s at `pos+k+1..`. Writes the accepted tokens; returns
    n and the next draft (empty unless all k drafts were accepted)."""
    k = draft.shape[1]
    end = pos + k + 1 + width
    rows.seq[:, pos + 1:pos + k + 1] = draft
    rows.seq[:, pos + k + 1:end] = mask_token_id
    keep = torch.arange(k + 1 + width, device=draft.device)
    keep = torch.cat([keep[:k + 1], keep[k + 2 - shift:k + 1 + width - shift]])  # causal rows, then draft rows
    logits = _forward(run, rows.seq, pos, end, keep, noisy=width)
    rows.count_forward()
    n, tokens = accept(draft, _argmax(logits[:, :k + 1], mask_token_id))
    rows.seq[:, pos + 1:pos + n + 2] = tokens
    run.keep_until(pos + n + 1)  # cache: g and the n accepted drafts; the noisy block's KV is dropped
    if n < k:
        return n, draft[:, :0]
    return n, noisy_draft(logits[:, k + 1:], pos + k + 2, mask_token_id)


def noisy_draft(logits: Tensor, first: int, mask_token_id: int) -> Tensor:
    """`(B, L)`: the fused form's next draft for positions `first..first+L-1`, from the noisy block's logits."""
    return _argmax(logits, mask_token_id)


def _stop(run: Runner, rows: ActiveRows, stopper: Stopper, start: int, end: int) -> Tensor | None:
    """Rows that committed EOS / a stop string in `seq[:, start:end]` leave the batch; the kept row indices
    (None: all kept)."""
    if not stopper.active:
        return None
    finished = stopper.done_in_block(rows.seq, rows.seq[:, start:end].tolist(), None, start, rows.prompt_len)
    if not any(finished):
        return None
    keep = rows.drop(finished, end)
    run.select(keep)
    return keep


def speculative(run: Runner, input_ids: Tensor, max_new_tokens: int, draft_len: int, mask_token_id: int,
                stopper: Stopper, shift: bool = False, fused: bool = True) -> ActiveRows:
    """Greedy self-speculative decoding over `run`'s token-causal cache; drafts of `draft_len` tokens."""
    prompt_len = input_ids.shape[1]
    total = prompt_len + max_new_tokens
    seq = torch.cat([input_ids, input_ids.new_zeros(input_ids.shape[0], max_new_tokens + 1)], dim=1)  # +1: bonus
    rows = ActiveRows(seq, prompt_len)
    logits = run(rows.seq, 0, prompt_len, 1, first=True)[:, -1]
    rows.seq[:, prompt_len] = _argmax(logits, mask_token_id)
    rows.count_forward()
    pos, draft = prompt_len, rows.seq[:, :0]
    _stop(run, rows, stopper, pos, pos + 1)
    while rows.active and pos + 1 < total:
        if fused:
            draft = draft[:, :total - pos - 1]
            width = min(draft_len + 1, total - pos - 1 - draft.shape[1])
            n, draft = fused_step(run, rows, pos, draft, width if width > 1 else 0, mask_token_id, shift)
        else:
            n = _step(run, rows, pos, min(draft_len, total - pos - 1), mask_token_id, shift)
        keep = _stop(run, rows, stopper, pos + 1, min(pos + n + 2, total))
        draft = draft if keep is None else draft[keep]
        pos += n + 1
    rows.drop([True] * len(rows.ids), total)
    return rows
