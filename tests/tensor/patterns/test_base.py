"""The Pattern base: the view composed from a pattern's two rules, and the layout helpers every pattern inherits."""

from __future__ import annotations

import torch

from dlm.tensor import patterns
from dlm.tensor.patterns import Slots


def _slots(index, block, noisy, group):
    return Slots(*(torch.tensor(v) for v in (index, block, noisy, group)))


def test_the_view_joins_the_clean_rule_the_noisy_rule_and_the_groups():
    pattern = patterns.get("block", block_size=2)
    # tokens: clean c0 c1 (block 0), clean c2 c3 (block 1), noisy n4 n5 (block 2, group 1)
    tokens = _slots([0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2], [False] * 4 + [True] * 2, [0, 0, 0, 0, 1, 1])
    q, k = Slots(*(t[:, None] for t in tokens)), Slots(*(t[None, :] for t in tokens))
    assert pattern.view(q, k).int().tolist() == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # clean tokens never see noisy ones
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],  # a noisy block sees the earlier clean blocks and its own group
        [1, 1, 1, 1, 1, 1],
    ]


def test_resized_keeps_the_options():
    window = patterns.get("block_window", block_size=2, options={"window": 3})
    assert window.resized(8) == patterns.get("block_window", block_size=8, options={"window": 3})


def test_shift_predicts_token_i_from_row_i_minus_1_on_one_half():
    assert patterns.get("block", block_size=2).predicting_rows(4, shift=True).tolist() == [0, 0, 1, 2]


def test_describe_names_the_block_size_and_options():
    assert patterns.get("block_window", block_size=4).describe(L=8) == "block_window (L=8, block_size=4, window=2)"
