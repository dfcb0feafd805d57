"""Lossless self-speculative decoding: the diffusion path drafts, the causal path of the same
network verifies.

A checkpoint trained with `attention.clean_context: causal` (and the joint objective) has a clean
half that is a causal LM, so its clean KV cache is exactly an AR model's cache (the token-causal
layout, as the lean AR mode uses). With the cache holding the committed prefix and each row's next
token `g` known, two forms:

- separate (two forwards a step): a draft forward of `[g, MASK x k]`, bidirectional among themselves
  over the cache (the noisy block of training), gives the drafts `d_1..d_k` (its KV is dropped); a
  causal forward of `[g, d_1..d_k]` gives the causal greedy tokens `v_1..v_{k+1}`.
- fused (one forward a step, Nemotron-Labs-Diffusion's form): `[g, d_1..d_k]` causally, followed by
  a noisy block of `k + 1` [MASK]s that sees the cache, `g`, the drafts and itself. The causal rows
  verify; the noisy rows are the row's next draft, kept only when it accepted every draft (they were
  conditioned on them). A row that rejects a draft has none for its next step, which then gains it
  one token: at a per-token acceptance of 0.6 and k = 3, a third of the steps.
- branched (one forward a step): as fused, with a noisy block for every count n = 0..k of drafts a
  row may accept, each seeing the cache, `g` and `d_1..d_n` only (its slots take the block id of
  `d_{n+1}`, so the pattern's noisy rule hides the rest; each block is its own group). After
  verifying, each row keeps the block of the count it accepted, so every step has a draft. It adds
  `k (k + 1)` query tokens a forward: nearly free where decoding is weight-bound (a GPU at small
  batch, a CPU with AMX), 1.6x one token at k = 3 on an AVX-512 CPU (BENCHMARKS.md §14). With
  `branches` < k + 1, each row drafts only after the counts its drafts' confidences make most
  likely (:func:`likely_counts`); a row that accepts another count goes on as in the fused form.

Each row accepts the longest prefix of its drafts with `d_j == v_j` (n drafts) plus the causal
path's next token `v_{n+1}` (:func:`accept`). Every committed token is the causal greedy argmax
given the row's committed prefix, so the output equals the AR mode's token for token; a draft that
is all wrong still gains one token, one that is all right gains k + 1.

Per-row acceptance in a batch: the rows share cache slots, not positions. A step occupies `k + 1`
slots (`g` and the drafts); where a row accepted fewer than `k` drafts (or had fewer), the rest of
its slots become holes (`layout.real` False: no query sees them) and its positions go on from its
last committed token, so each row advances by its own count (`_Rows`). `nfe` counts the prefill
(whose last logit gives the first token, as in the AR mode's count) and every forward of every step.
The drafts come from a `Drafter` (`dlm.decoding.drafting`; default the model's own noisy block), the
one place a different drafter plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.decoding.batch import ActiveRows
from dlm.decoding.drafting import Drafter, DraftRequest
from dlm.decoding.policies import without_mask
from dlm.decoding.runner import Runner
from dlm.decoding.stopping import Stopper


def slots_needed(max_new_tokens: int, draft_len: int, form: str = "fused") -> int:
    """Cache slots past the prompt a call may occupy: every step gains each row >= 1 token and takes
    at most `draft_len + 1` slots, plus its noisy blocks of `draft_len + 1` (one per acceptance
    count when branched)."""
    extra = draft_len * (draft_len + 1) if form == "branched" else 0
    return (max_new_tokens + 1) * (draft_len + 1) + extra


def accepted_counts(draft: Tensor, verified: Tensor) -> Tensor:
    """`(B,)`: per row, the drafts `draft` `(B, k)` that match the causal greedy tokens
    `verified[:, :k]` as a prefix (`verified` `(B, k + 1)`: the causal argmax at each verify
    input)."""
    return (draft == verified[:, :-1]).long().cumprod(dim=1).sum(dim=1)


def accept(draft: Tensor, verified: Tensor, limit: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row: (n `(B,)`, its drafts matching the causal greedy tokens as a prefix, at most
    `limit`; the causal path's own next token `(B,)`, `verified[:, n]`). n = 0 (all wrong) still
    gives one token; n = k gives k + 1."""
    counts = accepted_counts(draft, verified)
    counts = counts if limit is None else torch.minimum(counts, limit)
    return counts, verified.gather(1, counts[:, None])[:, 0]


def likely_counts(conf: Tensor, usable: Tensor, m: int) -> Tensor:
    """`(B, m)`: per row, the `m` acceptance counts most likely, most likely first, taking each of
    its drafts as accepted with its own probability `conf` `(B, k)`: P(n) = c_1..c_n (1 - c_{n+1}),
    with no draft past `usable` `(B,)` (its length, or its length limit) accepted."""
    k = conf.shape[1]
    c = torch.where(torch.arange(k, device=conf.device) < usable[:, None], conf, 0)
    ones = torch.ones_like(c[:, :1])
    prob = torch.cat([ones, c.cumprod(dim=1)], dim=1) * torch.cat([1 - c, ones], dim=1)
    return prob.topk(m, dim=1).indices


def draft_confidence(logits: Tensor | None, draft: Tensor, mask_token_id: int) -> Tensor:
    """`(B, k)`: the probability the noisy block gave each drafted token (1 without logits: an
    external drafter's drafts count as sure)."""
    if logits is None:
        return torch.ones(draft.shape, device=draft.device)
    probs = torch.softmax(without_mask(logits, mask_token_id).float(), dim=-1)
    return probs.gather(-1, draft[..., None])[..., 0]


@dataclass(frozen=True)
class Speculation:
    """The settings of one speculative call."""

    max_new_tokens: int
    draft_len: int
    mask_token_id: int
    drafter: Drafter
    shift: bool = False
    form: str = "fused"
    """`decode.speculative_form`: fused, separate or branched."""
    branches: int | None = None
    """`decode.speculative_branches`: branched only, noisy blocks a forward (None: k + 1)."""

    @property
    def fused(self) -> bool:
        """One forward a step verifies and drafts (fused, branched)."""
        return self.form != "separate"

    @property
    def branched(self) -> bool:
        """A fused step drafts with one noisy block per acceptance count."""
        return self.form == "branched"


@dataclass
class _Rows:
    """Per active row: the position of its next token `g` (at the common slot `pos`), its tokens so
    far, and its next draft (`draft` `(B, k)`, `lens` real ones each; [MASK] past them, which no
    causal argmax equals; `conf`: the probability the drafter gave each)."""

    g_pos: Tensor  # (B,) long
    generated: list[list[int]]
    draft: Tensor
    lens: Tensor  # (B,) long
    conf: Tensor  # (B, k)

    def select(self, keep: Tensor) -> None:
        self.g_pos, self.draft, self.lens = self.g_pos[keep], self.draft[keep], self.lens[keep]
        self.conf = self.conf[keep]
        self.generated = [self.generated[k] for k in keep.tolist()]


class _Decode:
    """One call's story: prefill, then steps of draft and verify until every row is done. Holds the
    runner (cache and layout), the batch (`rows`), each row's progress (`st`) and the settings; the
    methods change them."""

    def __init__(self, run: Runner, rows: ActiveRows, spec: Speculation, stopper: Stopper) -> None:
        self.run, self.rows, self.spec, self.stopper = run, rows, spec, stopper
        self.st: _Rows | None = None

    # -- forwards ----------------------------------------------------------------------------------
    def forward(self, start: int, end: int, keep: int | Tensor, *, noisy: int = 0,
                first: bool = False, group_width: int | None = None) -> Tensor:
        """Logits of inputs `start:end`, whose last `noisy` are one noisy block (or groups of
        `group_width`); the mask is built fresh (the holes change every step). `first`: the prompt's
        forward, uncompiled (its shape is the prompt's)."""
        mask = self.run.fresh_mask(start, end, (end - noisy, end) if noisy else None,
                                   group_width=group_width)
        return self.run(self.rows.seq, start, end, keep, first=first, mask=mask)

    def argmax(self, logits: Tensor) -> Tensor:
        return without_mask(logits, self.spec.mask_token_id).argmax(dim=-1)

    def place(self, start: int, first_pos: Tensor, lens: Tensor, width: int) -> None:
        """Slots `start..start+width-1` hold, per row, `lens` real tokens at positions
        `first_pos..`; holes after."""
        j = torch.arange(width, device=lens.device)
        self.run.layout.real[:, start:start + width] = j[None, :] < lens[:, None]
        self.run.layout.position_ids[:, start:start + width] = first_pos[:, None] + j[None, :]

    def draft(self, first: Tensor, length: int, logits: Tensor | None,
              rows: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """The drafter's tokens and the probability the noisy block gave each, for every row or
        for `rows` (indices into the batch) only."""
        ids = list(self.rows.ids) if rows is None else [self.rows.ids[r] for r in rows]
        draft = self.spec.drafter.draft(DraftRequest(ids, first, length, logits))
        # only fewer branches than counts read the probabilities
        chosen = logits if self.spec.branches is not None else None
        return draft, draft_confidence(chosen, draft, self.spec.mask_token_id)

    # -- the story ---------------------------------------------------------------------------------
    def prefill(self, g_pos: Tensor, width: int) -> None:
        """The prompt's forward: its last logit gives each row's first token `g`. With `width`, a
        noisy block of `width` [MASK]s after the prompt (from `g`'s position on) drafts the
        `width - 1` tokens after `g` in the same forward, so the first step verifies at once (no
        draft-only step)."""
        rows, spec, prompt_len = self.rows, self.spec, self.rows.prompt_len
        if not width:
            last_logit = self.run(rows.seq, 0, prompt_len, 1, first=True)[:, -1]
            g, (draft, conf) = self.argmax(last_logit), (rows.seq[:, :0], None)
        else:
            end = prompt_len + width
            rows.seq[:, prompt_len:end] = spec.mask_token_id
            drafted = range(prompt_len + 1 - spec.shift, end - spec.shift)
            keep = torch.tensor([prompt_len - 1, *drafted], device=g_pos.device)
            logits = self.forward(0, end, keep, noisy=width, first=True)
            self.run.keep_until(prompt_len)  # the noisy block's KV is not the causal one: drop it
            g, (draft, conf) = self.argmax(logits[:, 0]), self.draft(g_pos + 1, width - 1,
                                                                     logits[:, 1:])
        rows.seq[:, prompt_len] = g
        rows.count_forward()
        conf = torch.ones(draft.shape, device=draft.device) if conf is None else conf
        self.st = _Rows(g_pos, [[t] for t in g.tolist()], draft,
                        torch.full_like(g, draft.shape[1]), conf)
        self.stop([1] * len(self.st.generated))

    def separate_step(self, pos: int, k: int, limit: Tensor) -> list[int]:
        """A draft forward (when the drafter reads the noisy block), then a causal verify forward of
        `[g, drafts]`; the tokens each row gained."""
        rows, st, spec = self.rows, self.st, self.spec
        self.place(pos + 1, st.g_pos + 1, torch.full_like(limit, k), k)
        draft = rows.seq[:, pos + 1:pos + 1]
        if k:  # a row's last token needs no draft
            logits = None
            if spec.drafter.noisy_pass:
                rows.seq[:, pos + 1:pos + k + 1] = spec.mask_token_id
                logits = self.forward(pos, pos + k + 1, k + spec.shift, noisy=k + 1)[:, :k]
                self.run.keep_until(pos)  # the draft's KV is not the causal one: drop it
                rows.count_forward()
            draft = self.draft(st.g_pos + 1, k, logits)[0]
        rows.seq[:, pos + 1:pos + k + 1] = draft
        logits = self.forward(pos, pos + k + 1, k + 1)
        rows.count_forward()
        return self.verify(pos, draft, logits, limit)[1]

    def fused_step(self, pos: int, width: int, limit: Tensor) -> list[int]:
        """One forward: verify each row's draft and draft its next `width - 1` tokens with a noisy
        block of `width` [MASK]s after the drafts; a row keeps that draft only when it accepted all
        of its drafts. Branched: one such block per acceptance count (or per likely count), and
        each row keeps the one of the count it accepted. Returns the tokens each row gained."""
        rows, st, shift = self.rows, self.st, self.spec.shift
        draft, lens = st.draft, st.lens
        k = draft.shape[1]
        counts_drafted = self.branch_counts(k, limit) if self.spec.branched and width else None
        branches = 0 if not width else 1 if counts_drafted is None else counts_drafted.shape[1]
        end = pos + k + 1 + branches * width
        rows.seq[:, pos + 1:pos + k + 1] = draft
        rows.seq[:, pos + k + 1:end] = self.spec.mask_token_id
        self.place(pos + 1, st.g_pos + 1, lens, k)
        natural = None  # branched: the slots' own block ids, restored after the forward
        if counts_drafted is not None:
            natural = self.run.layout.block_ids[:, pos + 1:end].clone()
            for j, n in enumerate(counts_drafted.unbind(dim=1)):  # block j sees g and d_1..d_n
                first = pos + k + 1 + j * width
                self.place(first, st.g_pos + n + 1, torch.full_like(lens, width), width)
                self.run.layout.block_ids[:, first:first + width] = natural.gather(1, n[:, None])
        else:
            self.place(pos + k + 1, st.g_pos + lens + 1, torch.full_like(lens, width), width)
        keep = torch.arange(k + 1 + branches * width, device=draft.device)
        # causal rows, then each block's draft rows
        keep = torch.cat([keep[:k + 1], *(keep[k + 1 + n * width + 1 - shift:
                                               k + 1 + (n + 1) * width - shift]
                                          for n in range(branches))])
        logits = self.forward(pos, end, keep, noisy=branches * width, group_width=width)
        rows.count_forward()
        if natural is not None:
            self.run.layout.block_ids[:, pos + 1:end] = natural
        g_pos = st.g_pos  # verify moves it past the accepted tokens
        counts, new = self.verify(pos, draft, logits[:, :k + 1], limit)
        if not branches:  # no row needs a next draft
            st.draft, st.lens, st.conf = draft[:, :0], torch.zeros_like(lens), st.conf[:, :0]
            return new
        noisy = logits[:, k + 1:].unflatten(1, (branches, width - 1))
        if counts_drafted is None:  # fused: the one block, drafted after all of a row's drafts
            self.next_drafts(noisy, lens[:, None], counts, g_pos, every=True)
        else:
            self.next_drafts(noisy, counts_drafted, counts, g_pos, every=branches == k + 1)
        return new

    def next_drafts(self, noisy: Tensor, drafted: Tensor, counts: Tensor, g_pos: Tensor, *,
                    every: bool) -> None:
        """Each row's next draft, from the block (of `noisy` `(B, blocks, k)`) drafted after the
        count it accepted (`drafted` `(B, blocks)`: each block's count); a row without that block
        has none (the fused form's rule). `every`: each row has its block, or the fused form's
        rule holds, so the drafter sees the whole batch; otherwise only the rows that have theirs
        ask it (one sync). `g_pos`: each row's `g` position before this step."""
        st, length = self.st, noisy.shape[2]
        hit = drafted == counts[:, None]
        block = hit.long().argmax(dim=1)  # a row without its count: any block, then dropped
        noisy = noisy[torch.arange(len(counts), device=counts.device), block]
        first = g_pos + drafted.gather(1, block[:, None])[:, 0] + 2  # after the drafts it saw
        kept = hit.any(dim=1)
        if every:
            next_draft, st.conf = self.draft(first, length, noisy)
            st.draft = torch.where(kept[:, None], next_draft, self.spec.mask_token_id)
        else:
            ids = kept.nonzero()[:, 0]
            st.draft = torch.full((len(counts), length), self.spec.mask_token_id,
                                  dtype=torch.long, device=counts.device)
            st.conf = torch.zeros(st.draft.shape, device=counts.device)
            if len(ids):
                st.draft[ids], st.conf[ids] = self.draft(first[ids], length, noisy[ids],
                                                         ids.tolist())
        st.lens = torch.where(kept, length, 0)

    def branch_counts(self, k: int, limit: Tensor) -> Tensor:
        """`(B, m)`: the acceptance counts each row drafts after this step: all `0..k` (the
        branched form's default), or the `decode.speculative_branches` most likely."""
        st, m = self.st, self.spec.branches
        if m is None or m >= k + 1:
            return torch.arange(k + 1, device=st.lens.device).expand(len(st.lens), k + 1)
        return likely_counts(st.conf, torch.minimum(st.lens, limit), m)

    def verify(self, pos: int, draft: Tensor, logits: Tensor,
               limit: Tensor) -> tuple[Tensor, list[int]]:
        """Per row: accept (at most `limit` drafts), commit, turn the unaccepted draft slots into
        holes, place the causal next token at slot `pos + k + 1`. Returns the per-row counts, and
        the tokens each row gained (host); the cache keeps `:pos + k + 1`."""
        st, k = self.st, draft.shape[1]
        counts, g = accept(draft, self.argmax(logits), limit)
        self.place(pos + 1, st.g_pos + 1, counts, k)
        self.run.keep_until(pos + k + 1)
        self.rows.seq[:, pos + k + 1] = g
        self.place(pos + k + 1, st.g_pos + counts + 1, torch.ones_like(counts), 1)
        # the step's one sync
        host = torch.cat([counts[:, None], g[:, None], draft], dim=1).tolist()
        for gen, (n, nxt, *d) in zip(st.generated, host):
            gen += d[:n] + [nxt]
        st.g_pos = st.g_pos + counts + 1
        return counts, [row[0] + 1 for row in host]

    def stop(self, new: list[int]) -> None:
        """Rows that reached the length limit, or committed EOS / a stop string among their `new`
        last tokens, leave the batch with their tokens."""
        st, limit = self.st, self.spec.max_new_tokens
        finished = [len(gen) >= limit or self.stopper.ends(gen[-n:], gen)
                    for gen, n in zip(st.generated, new)]
        if any(finished):
            keep = self.rows.drop(finished, 0, tokens=st.generated)
            self.run.select(keep)
            st.select(keep)

    def step(self, pos: int) -> int:
        """One draft-and-verify step at slot `pos`; returns the slots it took."""
        st, spec = self.st, self.spec
        # drafts a row may still accept
        left = [spec.max_new_tokens - len(gen) - 1 for gen in st.generated]
        limit = torch.tensor(left, device=st.g_pos.device)
        if spec.fused:
            st.draft, st.lens = st.draft[:, :spec.draft_len], torch.minimum(st.lens, limit)
            k = st.draft.shape[1]
            # no row needs a next draft: no noisy block
            width = spec.draft_len + 1 if max(left) > k else 0
            new = self.fused_step(pos, width, limit)
        else:
            k = min(spec.draft_len, max(left))
            new = self.separate_step(pos, k, limit)
        self.stop(new)
        return k + 1


def speculative(run: Runner, input_ids: Tensor, spec: Speculation, stopper: Stopper) -> ActiveRows:
    """Greedy self-speculative decoding over `run`'s token-causal cache (its layout holds
    `slots_needed(spec.max_new_tokens, spec.draft_len)` slots past the prompt)."""
    prompt_len = input_ids.shape[1]
    room = input_ids.new_zeros(input_ids.shape[0], run.layout.total - prompt_len)
    rows = ActiveRows(torch.cat([input_ids, room], dim=1), prompt_len)
    decode = _Decode(run, rows, spec, stopper)
    n = spec.max_new_tokens
    width = min(spec.draft_len, n - 1) + 1 if spec.fused and spec.draft_len and n > 1 else 0
    decode.prefill(run.layout.position_ids[:, prompt_len].clone(), width)
    pos = prompt_len
    while rows.active:
        pos += decode.step(pos)
    return rows
