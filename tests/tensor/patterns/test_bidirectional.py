"""`bidirectional`: full attention in training; decoding over a cache approximates it block-causally."""

from __future__ import annotations

from dlm.tensor import patterns
from dlm.tensor.attention import dense_mask


def test_every_token_sees_every_token():
    assert dense_mask(patterns.get("bidirectional", block_size=2), 4).all()


def test_its_cache_is_not_exact_and_flash_serves_it_without_a_mask():
    pattern = patterns.get("bidirectional")
    assert not pattern.exact_cache and not pattern.autoregressive and pattern.flash_is_causal is False
