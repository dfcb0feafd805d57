"""`block`: block-causal over the noisy sequence alone (a noisy context in training)."""

from __future__ import annotations

import torch

from dlm.tensor import patterns
from dlm.tensor.attention import dense_mask

T, F = True, False


def test_literal_mask_l4_block2():
    assert dense_mask(patterns.get("block", block_size=2), 4).tolist() == [
        [T, T, F, F], [T, T, F, F], [T, T, T, T], [T, T, T, T]]


def test_block_size_one_is_causal_and_full_block_is_bidirectional():
    assert torch.equal(dense_mask(patterns.get("block", block_size=1), 10), dense_mask(patterns.get("causal"), 10))
    assert torch.equal(dense_mask(patterns.get("block", block_size=10), 10),
                       dense_mask(patterns.get("bidirectional", block_size=10), 10))


def test_it_needs_a_mask_on_flash_and_has_one_half():
    block = patterns.get("block", block_size=4)
    assert block.flash_is_causal is None and not block.two_halves and block.input_length(12) == 12
