"""`block_clean`: x_t ⊕ x_0, a noisy block seeing itself and the clean blocks before it; with a causal clean
context the clean half is a causal LM (joint AR + diffusion, self-speculation)."""

from __future__ import annotations

import pytest
import torch

from dlm.tensor import patterns
from dlm.tensor.attention import dense_mask


def clean(block_size: int, context: str = "block") -> patterns.Pattern:
    return patterns.get("block_clean", block_size=block_size, clean_context=context)


def test_literal_mask_l4_block2():
    # rows/cols: noisy n0..n3, clean c0..c3
    assert dense_mask(clean(2), 4).int().tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]


def test_literal_causal_clean_context_l4_block2():
    # the clean half is token-causal, the noisy half as block_clean
    assert dense_mask(clean(2, "causal"), 4).int().tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]


@pytest.mark.parametrize("block_size", [3, 4])
def test_causal_clean_context_halves(block_size):
    L = 12
    causal, block = dense_mask(clean(block_size, "causal"), L), dense_mask(clean(block_size), L)
    assert torch.equal(causal[L:, L:], dense_mask(patterns.get("causal"), L))  # the clean half is a causal LM
    assert torch.equal(causal[:L], block[:L])  # noisy rows unchanged
    assert not causal[L:, :L].any()  # clean never sees noisy


def test_only_the_causal_clean_context_verifies():
    assert clean(4, "causal").verifies and not clean(4).verifies


def test_the_input_is_both_halves_at_the_same_positions():
    pattern = clean(2)
    noised, x0 = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    assert pattern.model_input(noised, x0).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert pattern.input_positions(torch.arange(4)[None]).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert pattern.input_length(4) == 8 and pattern.sequence_length(8) == 4


def test_with_shift_a_blocks_first_token_is_predicted_from_the_clean_row_before_it():
    assert clean(2).predicting_rows(6, shift=True).tolist() == [0, 0, 6 + 1, 2, 6 + 3, 4]
    assert clean(2).predicting_rows(6, shift=False).tolist() == list(range(6))
