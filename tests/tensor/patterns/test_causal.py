"""`causal`: the AR pattern, token-causal, trained with the AR loss and decoded in the AR mode."""

from __future__ import annotations

import torch

from dlm.tensor import patterns
from dlm.tensor.attention import dense_mask

T, F = True, False


def test_literal_mask_l4():
    assert dense_mask(patterns.get("causal", block_size=2), 4).tolist() == [
        [T, F, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]]


def test_it_is_autoregressive_and_served_by_flash_as_causal():
    causal = patterns.get("causal")
    assert causal.autoregressive and causal.verifies and causal.exact_cache and not causal.two_halves
    assert causal.flash_is_causal is True


def test_the_block_size_does_not_change_it():
    assert torch.equal(dense_mask(patterns.get("causal", block_size=1), 9),
                       dense_mask(patterns.get("causal", block_size=3), 9))
