"""Lossless self-speculative decoding: the diffusion path drafts, the causal path of the same network verifies.

A checkpoint trained with `attention.clean_context: causal` (and the joint objective) has a clean half that is
a causal LM, so its clean KV cache is exactly an AR model's cache (the token-causal layout, as the lean AR
mode uses). With the cache holding the committed prefix and each row's next token `g` known, two forms:

- separate (two forwards a step): a draft forward of `[g, MASK x k]`, bidirectional among themselves over the
  cache (the noisy block of training), gives the drafts `d_1..d_k` (its KV is dropped); a causal forward of
  `[g, d_1..d_k]` gives the causal greedy tokens `v_1..v_{k+1}`.
- fused (one forward a step, Nemotron-Labs-Diffusion's form): `[g, d_1..d_k]` causally, followed by a noisy
  block of `k + 1` [MASK]s that sees the cache, `g`, the drafts and itself. The causal rows verify; the noisy
  rows are the row's next draft, kept only when it accepted every draft (they were conditioned on them).

Each row accepts the longest prefix of its drafts with `d_j == v_j` (n drafts) plus the causal path's next
token `v_{n+1}` (:func:`accept`). Every committed token is the causal greedy argmax given the row's committed
prefix, so the output equals the AR mode's token for token; a draft that is all wrong still gains one token,
one that is all right gains k + 1.

Per-row acceptance in a batch: the rows share cache slots, not positions. A step occupies `k + 1` slots (`g`
and the drafts); where a row accepted fewer than `k` drafts (or had fewer), the rest of its slots become holes
(`layout.real` False: no query sees them) and its positions go on from its last committed token, so each row
advances by its own count (`_Rows`). `nfe` counts the prefill (whose last logit gives the first token, as in
the AR mode's count) and every forward of every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.decoding.batch import ActiveRows
from dlm.decoding.policies import without_mask
from dlm.decoding.runner import Runner
from dlm.decoding.stopping import Stopper
from dlm.tensor.attention import additive_mask


def slots_needed(max_new_tokens: int, draft_len: int) -> int:
    """Cache slots past the prompt a call may occupy: every step gains each row >= 1 token and takes at most
    `draft_len + 1` slots, plus a noisy block of `draft_len + 1`."""
    return (max_new_tokens + 1) * (draft_len + 1)


def accepted_counts(draft: Tensor, verified: Tensor) -> Tensor:
    """`(B,)`: per row, the drafts `draft` `(B, k)` that match the causal greedy tokens `verified[:, :k]`
    as a prefix (`verified` `(B, k + 1)`: the causal argmax at each verify input)."""
    return (draft == verified[:, :-1]).long().cumprod(dim=1).sum(dim=1)


def accept(draft: Tensor, verified: Tensor, limit: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row: (n `(B,)`, its drafts matching the causal greedy tokens as a prefix, at most `limit`; the causal
    path's own next token `(B,)`, `verified[:, n]`). n = 0 (all wrong) still gives one token; n = k gives k + 1."""
    counts = accepted_counts(draft, verified)
    counts = counts if limit is None else torch.minimum(counts, limit)
    return counts, verified.gather(1, counts[:, None])[:, 0]


def _argmax(logits: Tensor, mask_token_id: int) -> Tensor:
    return without_mask(logits, mask_token_id).argmax(dim=-1)


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


def _forward(run: Runner, seq: Tensor, start: int, end: int, keep: int | Tensor, *, noisy: int = 0,
             first: bool = False) -> Tensor:
    """`first`: the prompt's forward, uncompiled (its shape is the prompt's)."""
    return run(seq, start, end, keep, first=first, mask=_mask(run, start, end, noisy))


@dataclass
class _Rows:
    """Per active row: the position of its next token `g` (at the common slot `pos`), its tokens so far, and its
    next draft (`draft` `(B, k)`, `lens` real ones each; [MASK] past them, which no causal argmax equals)."""

    g_pos: Tensor  # (B,) long
    generated: list[list[int]]
    draft: Tensor
    lens: Tensor  # (B,) long

    def select(self, keep: Tensor) -> None:
        self.g_pos, self.draft, self.lens = self.g_pos[keep], self.draft[keep], self.lens[keep]
        self.generated = [self.generated[k] for k in keep.tolist()]


def _place(run: Runner, start: int, first_pos: Tensor, lens: Tensor, width: int) -> None:
    """Slots `start..start+width-1` hold, per row, `lens` real tokens at positions `first_pos..`; holes after."""
    j = torch.arange(width, device=lens.device)
    run.layout.real[:, start:start + width] = j[None, :] < lens[:, None]
    run.layout.position_ids[:, start:start + width] = first_pos[:, None] + j[None, :]


def draft_tokens(run: Runner, seq: Tensor, pos: int, k: int, mask_token_id: int, shift: bool, first: Tensor,
                 ids: list[int]) -> Tensor:
    """`(B, k)`: the diffusion path's one-pass guesses for positions `first..first+k-1` of each row (`g` at slot
    `pos`, cache `:pos`); `ids` name the rows in the caller's batch (what a drafter other than the model's own
    diffusion path, such as a test's oracle, looks drafts up by)."""
    seq[:, pos + 1:pos + k + 1] = mask_token_id
    logits = _forward(run, seq, pos, pos + k + 1, k + shift, noisy=k + 1)
    run.keep_until(pos)  # the draft's KV is not the causal one: drop it
    return _argmax(logits[:, :k], mask_token_id)


def noisy_draft(logits: Tensor, first: Tensor, mask_token_id: int, ids: list[int]) -> Tensor:
    """`(B, L)`: the fused form's next draft for positions `first..first+L-1` of each row, from the noisy
    block's logits (`ids`: as for :func:`draft_tokens`)."""
    return _argmax(logits, mask_token_id)


def _verify(run: Runner, rows: ActiveRows, st: _Rows, pos: int, draft: Tensor, logits: Tensor, limit: Tensor,
            mask_token_id: int) -> tuple[Tensor, list[int]]:
    """Per row: accept (at most `limit` drafts), commit, turn the unaccepted draft slots into holes, place the
    causal next token at slot `pos + k + 1`. Returns the per-row counts, and the tokens each row gained (host);
    the cache keeps `:pos + k + 1`."""
    k = draft.shape[1]
    counts, g = accept(draft, _argmax(logits, mask_token_id), limit)
    _place(run, pos + 1, st.g_pos + 1, counts, k)
    run.keep_until(pos + k + 1)
    rows.seq[:, pos + k + 1] = g
    _place(run, pos + k + 1, st.g_pos + counts + 1, torch.ones_like(counts), 1)
    host = torch.cat([counts[:, None], g[:, None], draft], dim=1).tolist()  # the step's one sync
    for gen, (n, nxt, *d) in zip(st.generated, host):
        gen += d[:n] + [nxt]
    st.g_pos = st.g_pos + counts + 1
    return counts, [row[0] + 1 for row in host]


def _separate_step(run: Runner, rows: ActiveRows, st: _Rows, pos: int, k: int, limit: Tensor, mask_token_id: int,
                   shift: bool) -> list[int]:
    """A draft forward, then a causal verify forward of `[g, drafts]`; the tokens each row gained."""
    _place(run, pos + 1, st.g_pos + 1, torch.full_like(limit, k), k)
    draft = rows.seq[:, pos + 1:pos + 1]
    if k:  # a row's last token needs no draft
        draft = draft_tokens(run, rows.seq, pos, k, mask_token_id, shift, st.g_pos + 1, rows.ids)
        rows.count_forward()
    rows.seq[:, pos + 1:pos + k + 1] = draft
    logits = _forward(run, rows.seq, pos, pos + k + 1, k + 1)
    rows.count_forward()
    return _verify(run, rows, st, pos, draft, logits, limit, mask_token_id)[1]


def _fused_step(run: Runner, rows: ActiveRows, st: _Rows, pos: int, width: int, limit: Tensor,
                mask_token_id: int, shift: bool) -> list[int]:
    """One forward: verify each row's draft and draft its next `width - 1` tokens with a noisy block of `width`
    [MASK]s after the drafts; a row keeps that draft only when it accepted all of its drafts. Returns the tokens
    each row gained."""
    draft, lens = st.draft, st.lens
    k = draft.shape[1]
    end = pos + k + 1 + width
    rows.seq[:, pos + 1:pos + k + 1] = draft
    rows.seq[:, pos + k + 1:end] = mask_token_id
    _place(run, pos + 1, st.g_pos + 1, lens, k)
    _place(run, pos + k + 1, st.g_pos + lens + 1, torch.full_like(lens, width), width)
    keep = torch.arange(k + 1 + width, device=draft.device)
    keep = torch.cat([keep[:k + 1], keep[k + 2 - shift:k + 1 + width - shift]])  # causal rows, then draft rows
    logits = _forward(run, rows.seq, pos, end, keep, noisy=width)
    rows.count_forward()
    noisy = noisy_draft(logits[:, k + 1:], st.g_pos + lens + 2, mask_token_id, rows.ids)
    counts, new = _verify(run, rows, st, pos, draft, logits[:, :k + 1], limit, mask_token_id)
    kept = counts == lens
    st.draft = torch.where(kept[:, None], noisy, torch.full_like(noisy, mask_token_id))
    st.lens = torch.where(kept, noisy.shape[1], 0)
    return new


def _stop(run: Runner, rows: ActiveRows, st: _Rows, stopper: Stopper, max_new_tokens: int, new: list[int]) -> None:
    """Rows that reached the length limit, or committed EOS / a stop string among their `new` last tokens, leave
    the batch with their tokens."""
    finished = [len(gen) >= max_new_tokens or stopper.ends(gen[-n:], gen) for gen, n in zip(st.generated, new)]
    if any(finished):
        keep = rows.drop(finished, 0, tokens=st.generated)
        run.select(keep)
        st.select(keep)


def _prefill(run: Runner, rows: ActiveRows, g_pos: Tensor, width: int, mask_token_id: int,
             shift: bool) -> tuple[Tensor, Tensor]:
    """The prompt's forward: its last logit gives each row's first token `g` `(B,)`. With `width`, a noisy block
    of `width` [MASK]s after the prompt (from `g`'s position on) drafts the `width - 1` tokens after `g` in the
    same forward `(B, width - 1)`, so the first step verifies at once (no draft-only step)."""
    prompt_len = rows.prompt_len
    if not width:
        logits = run(rows.seq, 0, prompt_len, 1, first=True)[:, -1]
        return _argmax(logits, mask_token_id), rows.seq[:, :0]
    end = prompt_len + width
    rows.seq[:, prompt_len:end] = mask_token_id
    keep = torch.tensor([prompt_len - 1, *range(prompt_len + 1 - shift, end - shift)], device=g_pos.device)
    logits = _forward(run, rows.seq, 0, end, keep, noisy=width, first=True)
    run.keep_until(prompt_len)  # the noisy block's KV is not the causal one: drop it
    return _argmax(logits[:, 0], mask_token_id), noisy_draft(logits[:, 1:], g_pos + 1, mask_token_id, rows.ids)


def speculative(run: Runner, input_ids: Tensor, max_new_tokens: int, draft_len: int, mask_token_id: int,
                stopper: Stopper, shift: bool = False, fused: bool = True) -> ActiveRows:
    """Greedy self-speculative decoding over `run`'s token-causal cache (its layout holds
    `slots_needed(max_new_tokens, draft_len)` slots past the prompt); drafts of `draft_len` tokens."""
    prompt_len = input_ids.shape[1]
    rows = ActiveRows(torch.cat([input_ids, input_ids.new_zeros(input_ids.shape[0], run.layout.total - prompt_len)],
                                dim=1), prompt_len)
    g_pos = run.layout.position_ids[:, prompt_len].clone()
    width = min(draft_len, max_new_tokens - 1) + 1 if fused and draft_len and max_new_tokens > 1 else 0
    g, draft = _prefill(run, rows, g_pos, width, mask_token_id, shift)
    rows.seq[:, prompt_len] = g
    rows.count_forward()
    st = _Rows(g_pos, [[t] for t in g.tolist()], draft, torch.full_like(g, draft.shape[1]))
    _stop(run, rows, st, stopper, max_new_tokens, [1] * len(st.generated))
    pos = prompt_len
    while rows.active:
        left = [max_new_tokens - len(gen) - 1 for gen in st.generated]  # drafts a row may still accept
        limit = torch.tensor(left, device=g.device)
        if fused:
            st.draft, st.lens = st.draft[:, :draft_len], torch.minimum(st.lens, limit)
            k = st.draft.shape[1]
            width = draft_len + 1 if max(left) > k else 0  # no row needs a next draft: no noisy block
            new = _fused_step(run, rows, st, pos, width, limit, mask_token_id, shift)
        else:
            k = min(draft_len, max(left))
            new = _separate_step(run, rows, st, pos, k, limit, mask_token_id, shift)
        pos += k + 1
        _stop(run, rows, st, stopper, max_new_tokens, new)
    return rows
