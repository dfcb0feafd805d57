"""Per-row positions and block ids of a left-padded batch, and the block-causal mask they give."""

from __future__ import annotations

import torch

from dlm.decoding.layout import Layout
from dlm.tensor import patterns


def block(size: int) -> patterns.Pattern:
    return patterns.get("block", block_size=size)



def test_each_row_has_the_positions_and_blocks_it_would_have_alone():
    layout = Layout.build(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), max_new_tokens=4, pattern=block(2))
    assert layout.prompt_len == 5 and layout.total == 9
    assert layout.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    # row 0: 3 prompt tokens -> prompt blocks 0, 0, 1; generation starts at block ceil(3 / 2) = 2
    assert layout.block_ids.tolist() == [[0, 0, 0, 0, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 3, 3, 4, 4]]
    assert layout.real.tolist()[0] == [False, False] + [True] * 7


def test_mask_is_block_causal_over_real_keys_and_pads_see_only_themselves():
    layout = Layout.build(torch.tensor([[0, 1, 1]]), max_new_tokens=4, pattern=block(2))
    mask = layout.mask(3, 5, keys=7)[0, 0]  # the first generated block over every key of the sequence
    assert mask.tolist() == [[False, True, True, True, True, False, False]] * 2  # own block yes, the next no
    pad = layout.mask(0, 1, keys=3)[0, 0]
    assert pad.tolist() == [[True, False, False]]


def test_block_size_one_is_token_causal():
    layout = Layout.build(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, pattern=block(1))
    mask = layout.mask(0, 5, keys=5)[0, 0]
    assert torch.equal(mask, torch.ones(5, 5, dtype=torch.bool).tril())


def test_select_keeps_the_rows_asked_for():
    layout = Layout.build(torch.tensor([[0, 1], [1, 1], [0, 1]]), max_new_tokens=2, pattern=block(2))
    kept = layout.select(torch.tensor([2, 0]))
    assert torch.equal(kept.position_ids, layout.position_ids[[2, 0]]) and kept.prompt_len == 2


def test_noisy_groups_see_themselves_and_the_committed_tokens_before_their_block_id():
    """Slots 2..7 noisy in groups of 3 (speculative decoding's branches): a group sees itself, not the other group,
    and the committed slots its block id allows (here the second group took the block id of slot 1)."""
    layout = Layout.build(torch.ones(1, 2, dtype=torch.long), max_new_tokens=6,
                          pattern=patterns.get("block_clean", clean_context="causal"))
    layout.block_ids[:, 5:8] = layout.block_ids[:, 1]
    mask = layout.mask(2, 8, keys=8, noisy=(2, 8), group_width=3)[0, 0].int()
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]] * 3 + [[1, 0, 0, 0, 0, 1, 1, 1]] * 3
    whole = layout.mask(2, 8, keys=8, noisy=(2, 8))[0, 0]
    assert whole[:, 2:].all()  # one group by default
