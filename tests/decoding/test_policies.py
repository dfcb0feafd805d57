"""The proposal (greedy or nucleus sampling) and the commit rules (threshold, factor, one token per forward,
sub-blocks) of a denoising pass, on hand-built tensors."""

from __future__ import annotations

import pytest
import torch

from dlm.decoding.policies import candidates, choose, propose, top_p_filter
from dlm.settings import DecodeConfig

MASK = 5
"""The [MASK] id in the hand-built logits below (vocabulary of 8)."""


def logits_favouring_the_mask(seed: int = 0, shape=(2, 3, 8)) -> torch.Tensor:
    """Random logits in which [MASK] has by far the highest score everywhere."""
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    logits[..., MASK] = 50.0
    return logits


# --- propose ------------------------------------------------------------------------------------------------


def test_greedy_never_proposes_the_mask_and_confidence_is_the_max_prob_over_the_rest():
    logits = logits_favouring_the_mask()
    tokens, conf = propose(logits, DecodeConfig(temperature=0.0), MASK, None)
    others = [i for i in range(logits.shape[-1]) if i != MASK]
    probs = logits[..., others].softmax(dim=-1)  # the distribution with [MASK] taken out
    assert tokens.shape == conf.shape == (2, 3)
    assert not (tokens == MASK).any()
    assert tokens.tolist() == torch.tensor(others)[probs.argmax(dim=-1)].tolist()
    torch.testing.assert_close(conf, probs.max(dim=-1).values)


def test_propose_leaves_the_callers_logits_untouched():
    logits = logits_favouring_the_mask()
    before = logits.clone()
    propose(logits, DecodeConfig(), MASK, None)
    propose(logits, DecodeConfig(temperature=1.0), MASK, torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)


def test_half_precision_logits_give_float32_confidences():
    tokens, conf = propose(logits_favouring_the_mask().bfloat16(), DecodeConfig(), MASK, None)
    assert conf.dtype == torch.float32 and not (tokens == MASK).any()


def test_sampling_never_draws_the_mask_and_confidence_is_the_drawn_tokens_prob():
    logits = logits_favouring_the_mask(shape=(4, 64, 8))
    cfg = DecodeConfig(temperature=2.0)
    tokens, conf = propose(logits, cfg, MASK, torch.Generator().manual_seed(0))
    assert not (tokens == MASK).any()
    assert len(tokens.unique()) > 2  # a flat distribution at temperature 2: really sampled, not argmax
    masked = logits.clone()
    masked[..., MASK] = -torch.inf
    probs = (masked / cfg.temperature).softmax(dim=-1)
    torch.testing.assert_close(conf, probs.gather(-1, tokens[..., None]).squeeze(-1))


def test_sampling_draws_only_inside_the_nucleus_and_renormalises_its_confidence():
    logits = torch.log(torch.tensor([[[0.05, 0.5, 0.3, 0.15]]], dtype=torch.float64)).expand(1, 200, 4).clone()
    tokens, conf = propose(logits, DecodeConfig(temperature=1.0, top_p=0.6), mask_token_id=0,
                           generator=torch.Generator().manual_seed(0))
    assert set(tokens.flatten().tolist()) == {1, 2}  # 0.5 + 0.3 reach 0.6 (0.05 is the mask, never drawn)
    expected = {1: 0.5 / 0.8, 2: 0.3 / 0.8}
    torch.testing.assert_close(conf, torch.tensor([[expected[t] for t in tokens[0].tolist()]], dtype=torch.float64))


def test_sampling_is_reproducible_with_the_same_generator_seed():
    logits = logits_favouring_the_mask(shape=(2, 32, 8))
    draw = lambda seed: propose(logits, DecodeConfig(temperature=1.0), MASK, torch.Generator().manual_seed(seed))[0]  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


# --- top_p_filter -------------------------------------------------------------------------------------------


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[[0.2, 0.5, 0.3]]], dtype=torch.float64)
    torch.testing.assert_close(top_p_filter(probs, 0.6), torch.tensor([[[0.0, 0.625, 0.375]]], dtype=torch.float64))


def test_top_p_of_one_keeps_every_token():
    probs = torch.tensor([[[0.2, 0.5, 0.3]]], dtype=torch.float64)
    assert top_p_filter(probs, 1.0) is probs


def test_top_p_below_the_top_prob_keeps_only_the_most_likely_token():
    probs = torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]], dtype=torch.float64)
    kept = top_p_filter(probs, 0.1)
    assert kept.tolist() == [[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]


# --- candidates ---------------------------------------------------------------------------------------------


def test_without_sub_blocks_every_masked_position_is_a_candidate():
    masked = torch.tensor([[False, True, False, True, True, False, True, True]])
    assert torch.equal(candidates(masked, None), masked)


def test_sub_blocks_allow_only_the_first_incomplete_sub_block_per_row():
    masked = torch.tensor([
        [True] * 8,  # nothing committed yet: the first sub-block
        [False, False, True, True, True, True, True, True],  # first sub-block half done: only its rest
        [False, False, False, False, True, False, True, True],  # first sub-block complete: the second
        [False, True, False, True, True, False, True, True],  # gaps: masked positions of sub-block 0 only
    ])
    expected = torch.tensor([
        [True, True, True, True, False, False, False, False],
        [False, False, True, True, False, False, False, False],
        [False, False, False, False, True, False, True, True],
        [False, True, False, True, False, False, False, False],
    ])
    assert torch.equal(candidates(masked, 4), expected)


def test_sub_block_of_one_allows_only_the_leftmost_masked_position():
    masked = torch.tensor([[False, True, True, False], [False, False, False, True]])
    assert candidates(masked, 1).tolist() == [[False, True, False, False], [False, False, False, True]]


def test_a_row_with_nothing_masked_has_no_candidates():
    masked = torch.tensor([[False] * 4, [True] * 4])
    assert candidates(masked, 2).tolist() == [[False] * 4, [True, True, False, False]]


# --- choose -------------------------------------------------------------------------------------------------


def test_factor_rule_on_a_hand_checked_case():
    conf = torch.tensor([[0.7, 0.99, 0.5, 0.9]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    # sorted 0.99, 0.9, 0.7, 0.5: (n + 1)(1 - c_n) = 0.02, 0.3, 1.2, 2.5 -> n = 2 with factor 1
    chosen = choose(conf, cand, DecodeConfig(policy="factor", factor=1.0))
    assert chosen.tolist() == [[False, True, False, True]]
    # threshold: at least the most confident even when none passes; never a non-candidate
    cand = torch.tensor([[True, False, True, True]])
    chosen = choose(conf, cand, DecodeConfig(threshold=0.95))
    assert chosen.tolist() == [[False, False, False, True]]


def test_threshold_commits_every_candidate_at_or_above_it_per_row():
    conf = torch.tensor([[0.7, 0.99, 0.5, 0.9], [0.2, 0.1, 0.3, 0.4]])
    cand = torch.tensor([[True, True, True, True], [True, True, False, True]])
    chosen = choose(conf, cand, DecodeConfig(threshold=0.7))
    assert chosen.tolist() == [[True, True, False, True], [False, False, False, True]]


def test_one_token_per_forward_commits_only_the_most_confident_candidate():
    conf = torch.tensor([[0.7, 0.99, 0.5, 0.9]])
    cand = torch.tensor([[True, False, True, True]])
    chosen = choose(conf, cand, DecodeConfig(threshold=0.1, one_token_per_forward=True))
    assert chosen.tolist() == [[False, False, False, True]]


def test_fixed_policy_commits_exactly_n_most_confident_candidates():
    conf = torch.tensor([[0.7, 0.99, 0.5, 0.9], [0.1, 0.2, 0.3, 0.4]])
    cand = torch.tensor([[True, True, True, True], [True, True, False, False]])
    chosen = choose(conf, cand, DecodeConfig(policy="fixed", tokens_per_pass=3))
    assert chosen.tolist() == [[True, True, False, True], [True, True, False, False]]  # row 2: all it has


def test_fixed_policy_decodes_at_a_known_tokens_per_forward(tokenizer):
    from dlm.decoding.engine import generate
    from tests.conftest import make_backbone

    bb = make_backbone("qwen3", tokenizer)
    ids = torch.tensor([tokenizer.encode("Question: 3 + 4?")])
    for n, nfe in ((1, 16), (2, 8), (4, 4), (3, 8)):  # 16 tokens in blocks of 4: 3 per pass needs 2 passes a block
        out = generate(bb.model, ids, mask_token_id=bb.mask_token_id, block_size=4, max_new_tokens=16, policy="fixed",
                       tokens_per_pass=n)
        assert out.nfe == nfe and out.num_generated == [16]


def test_the_threshold_rule_equals_the_top_n_rule_it_shortcuts():
    """`choose` takes a sort-free path for the threshold policy; it must pick what the general top-n rule picks
    (n = candidates at or above the threshold, at least one), ties and empty rows included."""
    from dlm.decoding.policies import _above_threshold

    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        conf = torch.randint(0, 5, (6, 7), generator=gen).double() / 4  # coarse values: many ties
        cand = torch.rand(6, 7, generator=gen) < 0.6
        cand[0] = False  # a row with nothing left
        for t in (0.25, 0.5, 1.0):
            sorted_conf, order = conf.masked_fill(~cand, -1.0).sort(dim=-1, descending=True, stable=True)
            n = (sorted_conf >= t).sum(dim=-1).clamp(min=1).clamp(max=cand.sum(dim=-1))
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(7).expand_as(order))
            expected = cand & (rank < n[:, None])  # the general rule's top-n, written out
            assert torch.equal(choose(conf, cand, DecodeConfig(threshold=t)), expected)
            assert torch.equal(_above_threshold(conf, cand, t), expected)


@pytest.mark.parametrize("cfg", [DecodeConfig(threshold=0.5), DecodeConfig(threshold=1.0),
                                 DecodeConfig(policy="factor"), DecodeConfig(policy="fixed", tokens_per_pass=2),
                                 DecodeConfig(one_token_per_forward=True)])
def test_no_candidate_mask_means_every_position_is_one(cfg):
    """A block's first pass passes `cand=None` (everything masked): the same choice as an all-True mask."""
    conf = torch.rand(5, 8, generator=torch.Generator().manual_seed(1)).double()
    conf[1, 3] = conf[1, 5] = conf[1].max()  # a tie at the top
    assert torch.equal(choose(conf, None, cfg), choose(conf, torch.ones_like(conf, dtype=torch.bool), cfg))
