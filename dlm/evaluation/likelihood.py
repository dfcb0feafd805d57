"""Exact log-likelihood of a continuation under a dlm model: block diffusion or causal AR.

Block diffusion (the decoder's layout) uses the left-to-right chain rule

    log p(c | x) = sum_i log p(c_i | x, c_<i, the rest of c_i's block masked)

i.e. the probability that the decoder, committing one token per pass from left to right, writes `c`.
The layout is the decoder's (context at positions 0..p-1, continuation blocks from block ceil(p/B)),
so for a single-token continuation (MMLU's " A") it is exactly the log-softmax at the masked
position after the context. The distribution is the decoder's: [MASK] is never a token, so it is
left out of the softmax. All n conditionals come from one forward per request: the context and
continuation (clean, block-causal) followed by one partially masked copy of its block per
continuation token, each copy seeing the clean earlier blocks and itself (the BD3-LM vectorised
trick).

Cost: one forward of p + n + sum_b w_b^2 <= p + n(1 + B) tokens (context p, continuation n in blocks
of w_b <= B; MMLU: p + 1, like one AR forward); long continuations are split so no forward holds
more than ~max_length copy tokens. Causal AR checkpoints use the ordinary causal log-likelihood (one
forward, full softmax). lm-eval's rolling windows (`dlm.evaluation.lm_eval_model.rolling_windows`)
are each scored by the same rule (~B forwards of <= 2 * max_length tokens per window for diffusion).
Not an ELBO: no Monte Carlo samples, no variance.

`method="elbo"` instead gives the Monte-Carlo ELBO the peers report (LLaDA, Dream, dllm), in the
same block layout: per sample and continuation block of w tokens, k ~ U{1..w} of them are masked
(a uniform subset), the copy sees the clean earlier blocks and its own unmasked tokens, and each
masked token's log-prob is weighted w / k (the realised-rate weight of training); the estimate is
the mean over `mc_num` samples, one forward of p + 2n tokens each. It bounds the log-likelihood only
where the model's conditionals are those of one joint distribution, so it can sit above or below the
chain rule; a single-token continuation gets the same exact value. The masks are drawn from a
generator seeded by `seed` and the request's own tokens, so a request scores the same in any batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from dlm.settings import ConfigError
from dlm.tensor.attention import additive_mask
from dlm.tensor.patterns import Pattern, Slots


@dataclass
class Row:
    """One forward's worth of tokens for scoring; index i is both token i and its logit."""

    ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)
    """0: clean (context, revealed continuation), block-causal;
    k > 0: the k-th partially masked copy."""
    reads: list[int] = field(default_factory=list)
    """Index whose logits predict targets[j]."""
    targets: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    """Per target; empty: all 1 (the chain rule). The ELBO's w / (k * mc_num)."""

    def add(self, ids: list[int], position_ids: list[int], block_ids: list[int],
            segment: int) -> int:
        """Append tokens; returns the index of the first."""
        start = len(self.ids)
        self.ids += ids
        self.position_ids += position_ids
        self.block_ids += block_ids
        self.segment += [segment] * len(ids)
        return start


Method = Literal["chain", "elbo"]


def score_continuations(model, pairs: list[tuple[list[int], list[int]]], *, pattern: Pattern,
                        mask_token_id: int, shift: bool, max_length: int, pad_token_id: int,
                        batch_size: int, disable_tqdm: bool = True, method: Method = "chain",
                        mc_num: int = 128, seed: int = 0) -> list[tuple[float, bool]]:
    """(log p(continuation | context), every step is the argmax)
    per (context ids, continuation ids) pair.

    An autoregressive `pattern` scores with the plain causal forward (`mask_token_id`, `shift`
    unused); any other by the chain rule above (or `method="elbo"`: the Monte-Carlo ELBO with
    `mc_num` samples), in the decoder's layout and masks for the pattern (at its block size) and
    `shift`.
    """
    causal, block_size = pattern.autoregressive, pattern.block_size
    rows, owner = [], []
    for k, (ctx, cont) in enumerate(pairs):
        if causal:
            new = ar_rows(ctx, cont, max_length=max_length)
        elif method == "elbo":
            rng = random.Random(f"{seed}:{ctx}:{cont}")
            new = elbo_rows(ctx, cont, block_size=block_size, mask_token_id=mask_token_id,
                            shift=shift, max_length=max_length, mc_num=mc_num, rng=rng)
        else:
            new = diffusion_rows(ctx, cont, block_size=block_size, mask_token_id=mask_token_id,
                                 shift=shift, max_length=max_length)
        rows += new
        owner += [k] * len(new)
    exclude_token = None if causal else mask_token_id
    per_row = score_rows(model, rows, pattern=pattern, exclude_token=exclude_token,
                         pad_token_id=pad_token_id, batch_size=batch_size,
                         disable_tqdm=disable_tqdm)
    totals = [(0.0, True) for _ in pairs]
    for k, (lp, greedy) in zip(owner, per_row):
        totals[k] = (totals[k][0] + lp, totals[k][1] and greedy)
    return totals


def ar_rows(context: list[int], continuation: list[int], *, max_length: int) -> list[Row]:
    """Ordinary causal scoring: `(context + continuation)[:-1]`, left-truncated to `max_length`."""
    _check_fits(continuation, max_length)
    seq = (context + continuation)[-(max_length + 1):][:-1]
    n = len(continuation)
    row = Row()
    # committed tokens under the causal rule
    row.add(seq, list(range(len(seq))), list(range(len(seq))), 0)
    row.reads, row.targets = list(range(len(seq) - n, len(seq))), list(continuation)
    return [row]


def diffusion_rows(context: list[int], continuation: list[int], *, block_size: int,
                   mask_token_id: int, shift: bool, max_length: int) -> list[Row]:
    """Chain-rule scoring rows (module docstring):
    clean part + one masked copy per continuation token.

    Positions follow `dlm.decoding.engine`: the continuation starts a fresh block after the context,
    whose left end is dropped so that context + continuation fit in `max_length` positions.
    Continuation blocks are grouped so each row holds about `max_length` copy tokens at most.
    """
    _check_fits(continuation, max_length - 1)
    context = context[-(max_length - len(continuation)):]
    p, n = len(context), len(continuation)
    first = -(-p // block_size)  # ceil(p / block_size): the first continuation block
    blocks = [(s, min(s + block_size, n)) for s in range(0, n, block_size)]
    rows, group = [], []
    for s, e in blocks:
        if group and sum((b - a) ** 2 for a, b in group) + (e - s) ** 2 > max_length:
            rows.append(_copy_row(context, continuation, group, first, block_size,
                                  mask_token_id, shift))
            group = []
        group.append((s, e))
    rows.append(_copy_row(context, continuation, group, first, block_size, mask_token_id, shift))
    return rows


def _copy_row(context: list[int], cont: list[int], group: list[tuple[int, int]], first: int,
              block_size: int, mask_token_id: int, shift: bool) -> Row:
    p, last_start = len(context), group[-1][0]
    row, copies = Row(), 0
    clean = context + cont[:last_start]  # what the group's blocks see clean; index == position
    context_blocks = [q // block_size for q in range(p)]
    cont_blocks = [first + j // block_size for j in range(last_start)]
    row.add(clean, list(range(len(clean))), context_blocks + cont_blocks, 0)
    for s, e in group:
        positions, block = list(range(p + s, p + e)), first + s // block_size
        for j in range(e - s):
            if shift and j == 0:  # Dream-style: the logit before the block predicts its first token
                row.reads.append(p + s - 1)
            else:
                copy = cont[s:s + j] + [mask_token_id] * (e - s - j)
                copies += 1
                start = row.add(copy, positions, [block] * len(copy), segment=copies)
                row.reads.append(start + j - (1 if shift else 0))
            row.targets.append(cont[s + j])
    return row


def elbo_rows(context: list[int], continuation: list[int], *, block_size: int, mask_token_id: int,
              shift: bool, max_length: int, mc_num: int, rng: random.Random) -> list[Row]:
    """One row per Monte-Carlo sample: the clean context and continuation, then one partially
    masked copy of every continuation block (module docstring)."""
    _check_fits(continuation, max_length - 1)
    context = context[-(max_length - len(continuation)):]
    p, n = len(context), len(continuation)
    first = -(-p // block_size)
    blocks = [(s, min(s + block_size, n)) for s in range(0, n, block_size)]
    rows = []
    for _ in range(mc_num):
        row, clean = Row(), context + continuation
        context_blocks = [q // block_size for q in range(p)]
        cont_blocks = [first + j // block_size for j in range(n)]
        row.add(clean, list(range(len(clean))), context_blocks + cont_blocks, 0)
        for copy, (s, e) in enumerate(blocks, start=1):
            width = e - s
            masked = sorted(rng.sample(range(width), rng.randint(1, width)))
            ids = [mask_token_id if j in masked else continuation[s + j] for j in range(width)]
            block_ids = [first + s // block_size] * width
            start = row.add(ids, list(range(p + s, p + e)), block_ids, segment=copy)
            # shift: the logit before a token predicts it; before the block, the clean half's
            for j in masked:
                row.reads.append(p + s - 1 if shift and j == 0 else start + j - (1 if shift else 0))
                row.targets.append(continuation[s + j])
                row.weights.append(width / len(masked) / mc_num)
        rows.append(row)
    return rows


def _check_fits(continuation: list[int], limit: int) -> None:
    if len(continuation) > limit:
        raise ConfigError(f"continuation of {len(continuation)} tokens: longer than the {limit} "
                          "the model can score (max_length); allowed: shorter continuations or "
                          "a larger model_args max_length")


def row_masks(rows: list[Row], length: int, device: torch.device | str, pattern: Pattern) -> Tensor:
    """`(B, 1, T, T)` bool, True = may attend, for rows right-padded to `length`:
    the pattern's view, as in decoding.

    Clean tokens (segment 0) are committed tokens; each copy is one noisy group, seeing itself and
    the clean keys the pattern's noisy rule allows. A pad query sees only itself (no empty softmax
    row); nothing sees a pad.
    """
    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (length - len(values))

    pos = torch.tensor([pad(r.position_ids, 0) for r in rows], device=device)
    blk = torch.tensor([pad(r.block_ids, 0) for r in rows], device=device)
    seg = torch.tensor([pad(r.segment, -1) for r in rows], device=device)
    q = Slots(pos[:, :, None], blk[:, :, None], seg[:, :, None] > 0, seg[:, :, None])
    k = Slots(pos[:, None, :], blk[:, None, :], seg[:, None, :] > 0, seg[:, None, :])
    sees = pattern.view(q, k) & (seg[:, None, :] >= 0)
    itself = torch.eye(length, dtype=torch.bool, device=device)[None]
    return torch.where(seg[:, :, None] >= 0, sees, itself)[:, None]


def score_rows(model, rows: list[Row], *, pattern: Pattern, exclude_token: int | None,
               pad_token_id: int, batch_size: int,
               disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """(sum of target log-probs, every target is the argmax) per row;
    `exclude_token` leaves the softmax."""
    device = next(model.parameters()).device
    # similar lengths share a batch
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), disable=disable_tqdm,
                      desc="dlm loglikelihood"):
        indices = order[start:start + batch_size]
        batch = [rows[i] for i in indices]
        scored = _score_batch(model, batch, pattern, exclude_token, pad_token_id, device)
        for i, result in zip(indices, scored):
            out[i] = result
    return out


def _score_batch(model, rows: list[Row], pattern: Pattern, exclude_token: int | None,
                 pad_token_id: int, device) -> list[tuple[float, bool]]:
    length = max(len(r.ids) for r in rows)
    ids = torch.tensor([r.ids + [pad_token_id] * (length - len(r.ids)) for r in rows],
                       device=device)
    pos = torch.tensor([r.position_ids + [0] * (length - len(r.ids)) for r in rows], device=device)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for b, r in enumerate(rows):
        keep[b, r.reads] = True
    mask = row_masks(rows, length, device, pattern)
    if model.config._attn_implementation == "eager":
        mask = additive_mask(mask, model.dtype)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                       logits_to_keep=keep).logits
        # (num_reads, V): row-major, ascending index
        logits = logits.reshape(-1, logits.shape[-1]).float()
        if exclude_token is not None:
            logits[:, exclude_token] = -torch.inf
        logprobs = logits.log_softmax(dim=-1)
    results, offset = [], 0
    for r in rows:
        rank = {idx: k for k, idx in enumerate(sorted(r.reads))}
        at = torch.tensor([offset + rank[i] for i in r.reads], device=device)
        targets = torch.tensor(r.targets, device=device)
        per_target = logprobs[at].gather(-1, targets[:, None]).squeeze(-1)
        lp = ((per_target * torch.tensor(r.weights, device=device)).sum() if r.weights
              else per_target.sum())
        greedy = bool((logprobs[at].argmax(dim=-1) == targets).all())
        results.append((float(lp), greedy))
        offset += len(r.reads)
    return results
