"""For every registered pattern: the decoder's mask is the training mask restricted to what a decode holds, cached
decoding equals recomputation (and self-speculative decoding the AR mode where the pattern verifies), and exact
likelihood scoring uses the decoder's layout. A new pattern file is checked here without a line of test."""

from __future__ import annotations

import pytest
import torch

from dlm.decoding.engine import generate
from dlm.decoding.layout import Layout
from dlm.decoding.text import left_pad
from dlm.evaluation.likelihood import ar_rows, diffusion_rows, row_masks
from dlm.settings import PATTERNS
from dlm.tensor import patterns
from dlm.tensor.attention import dense_mask
from tests.conftest import sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ([patterns.get(name, block_size=bs) for name in PATTERNS for bs in (1, 2, 3)]
            + [patterns.get("block_clean", block_size=bs, clean_context="causal") for bs in (2, 3)]
            + [patterns.get("block_window", block_size=2, options={"window": w}) for w in (1, 3)])
EXACT = [p for p in VARIANTS if p.exact_cache]


def _id(pattern: patterns.Pattern) -> str:
    return pattern.describe().replace(" ", "")


def _decode_layout(pattern: patterns.Pattern, prompt: int, new: int) -> Layout:
    return Layout.build(torch.ones(1, prompt, dtype=torch.long), new, pattern)


@pytest.mark.parametrize("pattern", EXACT, ids=_id)
def test_decode_mask_is_the_training_mask_restricted_to_the_decode(pattern):
    """Each generated block's pass: committed tokens (the clean half's tokens) and the block being denoised (its
    noisy tokens) see exactly what the same tokens see in training."""
    b = pattern.block_size
    length, prompt = 5 * b, b
    train = dense_mask(pattern, length)
    layout = _decode_layout(pattern, prompt, length - prompt)
    if pattern.autoregressive:  # decodes in the AR mode: every input is committed
        assert torch.equal(layout.mask(0, length, length)[0, 0], train)
        return
    for start in range(prompt, length, b):
        end = start + b
        got = layout.mask(0, end, end, (start, end))[0, 0]
        clean = [length + i if pattern.two_halves else i for i in range(start)]
        index = torch.tensor(clean + list(range(start, end)))
        assert torch.equal(got, train[index][:, index]), f"block at {start}"


@pytest.fixture(scope="module")
def bb(tokenizer):
    return sharp_backbone("qwen3", tokenizer)


@pytest.mark.parametrize("pattern", VARIANTS, ids=_id)
def test_cached_decoding_equals_recomputation(bb, pattern):
    ids, attention = left_pad([[11, 12, 13, 14, 15], [21, 22, 23]], 0)
    common = dict(attention_mask=attention, mask_token_id=bb.mask_token_id, block_size=pattern.block_size,
                  max_new_tokens=3 * pattern.block_size + 1, pattern=pattern, threshold=0.5,
                  mode="ar" if pattern.autoregressive else "diffusion")
    cached = generate(bb.model, ids, **common)
    recomputed = generate(bb.model, ids, use_cache=False, **common)
    assert cached.tokens == recomputed.tokens


@pytest.mark.parametrize("pattern", [p for p in VARIANTS if p.verifies and not p.autoregressive], ids=_id)
def test_speculative_decoding_equals_the_ar_mode(bb, pattern):
    ids, attention = left_pad([[11, 12, 13, 14, 15], [21, 22, 23]], 0)
    common = dict(attention_mask=attention, mask_token_id=bb.mask_token_id, max_new_tokens=9, pattern=pattern)
    ar = generate(bb.model, ids, mode="ar", **common)
    spec = generate(bb.model, ids, mode="speculative", block_size=3, **common)
    assert spec.tokens == ar.tokens


@pytest.mark.parametrize("pattern", [p for p in VARIANTS if p.block_size > 1 or p.autoregressive], ids=_id)
def test_likelihood_rows_use_the_decoders_masks(pattern):
    """The scoring row's clean tokens see each other as committed tokens do in a decode; each masked copy of a
    continuation block sees the committed tokens its block's decode pass sees, and itself."""
    context, continuation = list(range(10, 15)), list(range(20, 27))
    p, n = len(context), len(continuation)
    if pattern.autoregressive:
        (row,) = ar_rows(context, continuation, max_length=64)
        got = row_masks([row], len(row.ids), "cpu", pattern)[0, 0]
        assert torch.equal(got, _decode_layout(pattern, len(row.ids), 0).mask(0, len(row.ids), len(row.ids))[0, 0])
        return
    (row,) = diffusion_rows(context, continuation, block_size=pattern.block_size, mask_token_id=0, shift=False,
                            max_length=64)
    mask = row_masks([row], len(row.ids), "cpu", pattern)[0, 0]
    layout = _decode_layout(pattern, p, n)
    clean = [i for i, s in enumerate(row.segment) if s == 0]
    assert torch.equal(mask[clean][:, clean], layout.mask(0, len(clean), len(clean))[0, 0])
    for segment in sorted(set(row.segment) - {0}):
        copy = [i for i, s in enumerate(row.segment) if s == segment]
        start = row.position_ids[copy[0]]
        seen = [i for i in clean if row.position_ids[i] < start] + copy
        want = layout.mask(start, start + len(copy), start + len(copy), (start, start + len(copy)))[0, 0]
        assert torch.equal(mask[copy][:, seen], want), f"copy {segment}"
        assert not mask[copy][:, [i for i in range(len(row.ids)) if i not in seen]].any()
