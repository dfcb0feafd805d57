"""Exact continuation scoring: the chain rule in one forward against one forward per token, the causal
baseline against HF's own forward, row splitting and rolling windows."""

from __future__ import annotations

import pytest
import torch

from dlm.decoding.text import pad_token_id
from dlm.evaluation.likelihood import diffusion_rows, score_continuations
from dlm.tensor import patterns
from dlm.tensor.patterns import block_causal
from tests.conftest import sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "Question: Tom has 3 apples. Tom finds 4 more. How many apples does Tom have now?\nAnswer:"
CONTINUATIONS = [" A", " B", " 7", " Tom has 3 + 4 = 7 apples.\n#### 7"]


@pytest.fixture(scope="module")
def bb(tokenizer):
    """float64, so padding noise cannot flip an argmax between batched and single runs; sharpened x30."""
    return sharp_backbone("qwen3", tokenizer)


def scores(bb, pairs, *, causal=False, shift=False, block_size=4, max_length=256, batch_size=1):
    """`score_continuations` with what a block-4 checkpoint of `bb` gives it (max_length: its positions)."""
    pattern = patterns.get("causal" if causal else "block", block_size=block_size)
    return score_continuations(bb.model, pairs, pattern=pattern, mask_token_id=bb.mask_token_id,
                               shift=shift, max_length=max_length, pad_token_id=pad_token_id(bb.tokenizer),
                               batch_size=batch_size)


def log_probs(model, ids, block_ids, mask_id):
    """Decoder distribution at every position of one sequence under the block-causal rule."""
    blk = torch.tensor(block_ids)
    mask = block_causal(blk[:, None], blk[None, :])[None, None]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=mask,
                       position_ids=torch.arange(len(ids))[None]).logits[0]
    logits[:, mask_id] = -torch.inf
    return logits.log_softmax(-1)


def step_by_step(bb, ctx, cont, *, block_size=4, shift=False):
    """The chain rule with one forward per continuation token: ctx + cont[:i] + [MASK] to the block end."""
    p, first, total, greedy = len(ctx), -(-len(ctx) // block_size), 0.0, True
    for i in range(len(cont)):
        end = min((i // block_size + 1) * block_size, len(cont))
        ids = ctx + cont[:i] + [bb.mask_token_id] * (end - i)
        blocks = [q // block_size for q in range(p)] + [first + j // block_size for j in range(end)]
        lp = log_probs(bb.model, ids, blocks, bb.mask_token_id)[p + i - 1 if shift else p + i]
        total += float(lp[cont[i]])
        greedy &= int(lp.argmax()) == cont[i]
    return total, greedy


def test_single_token_continuation_is_the_log_softmax_at_the_masked_position(bb, tokenizer):
    ctx = tokenizer.encode(CONTEXT)
    p = len(ctx)
    direct = log_probs(bb.model, ctx + [bb.mask_token_id], [q // 4 for q in range(p)] + [-(-p // 4)],
                       bb.mask_token_id)[p]
    for token in (tokenizer.encode(" 7")[-1], int(direct.argmax())):
        (lp, greedy), = scores(bb, [(ctx, [token])])
        assert lp == pytest.approx(float(direct[token]), abs=1e-5)
        assert greedy == (token == int(direct.argmax()))


@pytest.mark.parametrize("shift", [False, True])
def test_chain_rule_in_one_forward_matches_one_forward_per_token(bb, tokenizer, shift):
    ctx = tokenizer.encode(CONTEXT)
    conts = [tokenizer.encode(c) for c in CONTINUATIONS]
    got = scores(bb, [(ctx, c) for c in conts], shift=shift, batch_size=3)
    for cont, (lp, greedy) in zip(conts, got):
        want, want_greedy = step_by_step(bb, ctx, cont, shift=shift)
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_long_continuations_split_into_rows_without_changing_the_score(bb, tokenizer):
    ctx, cont = tokenizer.encode(CONTEXT), tokenizer.encode(CONTINUATIONS[-1])
    rows = diffusion_rows(ctx, cont, block_size=4, mask_token_id=bb.mask_token_id, shift=False, max_length=40)
    assert len(rows) > 1 and all(sum(s > 0 for s in r.segment) <= 40 for r in rows)
    assert sum(len(r.targets) for r in rows) == len(cont)
    (lp, _), = scores(bb, [(ctx, cont)], max_length=40)
    kept = ctx[-(40 - len(cont)):]  # the context's left end is dropped to fit max_length positions
    assert lp == pytest.approx(step_by_step(bb, kept, cont)[0], abs=1e-4)


def test_ar_scoring_is_the_plain_causal_forward(bb, tokenizer):
    ctx, cont = tokenizer.encode(CONTEXT), tokenizer.encode(CONTINUATIONS[-1])
    with torch.no_grad():
        logits = bb.model(input_ids=torch.tensor([ctx + cont])).logits[0]  # HF's own causal mask
    want = logits.log_softmax(-1)[len(ctx) - 1:-1].gather(-1, torch.tensor(cont)[:, None]).sum()
    (lp, _), = scores(bb, [(ctx, cont)], causal=True)
    assert lp == pytest.approx(float(want), abs=1e-4)


# -- the Monte-Carlo ELBO --------------------------------------------------------------------------
def elbo(bb, pairs, *, mc_num, seed=0, batch_size=1):
    block = patterns.get("block", block_size=4)
    return score_continuations(bb.model, pairs, pattern=block, mask_token_id=bb.mask_token_id,
                               shift=False, max_length=256, pad_token_id=pad_token_id(bb.tokenizer),
                               batch_size=batch_size, method="elbo", mc_num=mc_num, seed=seed)


def test_elbo_of_a_single_token_is_its_exact_log_prob(bb, tokenizer):
    ctx, token = tokenizer.encode(CONTEXT), [tokenizer.encode(" 7")[-1]]  # w = 1: k = 1, weight 1, no variance
    (chain, _), = scores(bb, [(ctx, token)])
    (bound, _), = elbo(bb, [(ctx, token)], mc_num=3)
    assert bound == pytest.approx(chain, abs=1e-6)


def test_elbo_estimate_converges_to_the_expectation_over_masks(bb, tokenizer):
    """Two tokens in one block: k = 1 (one of them masked, weight 2) or k = 2 (both, weight 1), each with
    probability 1/2; the exact expectation from independent forwards, the tolerance from its exact variance."""
    ctx, cont = tokenizer.encode(CONTEXT), tokenizer.encode(" Tom has")[:2]
    p, mask = len(ctx), bb.mask_token_id
    blocks = [q // 4 for q in range(p)] + [-(-p // 4)] * 2

    def masked_lp(masked: set[int]) -> float:
        ids = ctx + [mask if j in masked else cont[j] for j in range(2)]
        lps = log_probs(bb.model, ids, blocks, mask)
        return sum(float(lps[p + j][cont[j]]) for j in masked)

    outcomes = [(0.25, 2 * masked_lp({0})), (0.25, 2 * masked_lp({1})), (0.5, masked_lp({0, 1}))]
    mean = sum(w * v for w, v in outcomes)
    std = sum(w * (v - mean) ** 2 for w, v in outcomes) ** 0.5
    (estimate, _), = elbo(bb, [(ctx, cont)], mc_num=256, batch_size=64)
    assert abs(estimate - mean) < 4 * std / 256 ** 0.5


def test_elbo_is_batch_invariant_and_set_by_its_seed(bb, tokenizer):
    ctx = tokenizer.encode(CONTEXT)
    pairs = [(ctx, tokenizer.encode(c)) for c in CONTINUATIONS]
    alone = [elbo(bb, [pair], mc_num=4)[0][0] for pair in pairs]
    batched = [lp for lp, _ in elbo(bb, pairs, mc_num=4, batch_size=3)]
    assert batched == pytest.approx(alone, abs=1e-9)
    other = elbo(bb, pairs[-1:], mc_num=4, seed=1)[0][0]
    assert other != pytest.approx(alone[-1], abs=1e-6)  # another seed draws other masks
