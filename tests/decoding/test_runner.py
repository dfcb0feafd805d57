"""The runner: static and dynamic caches give the same logits as no cache, the block mask is built once and
sliced, logits only where asked, forwards of a subset of rows equal the full batch's rows, and compiled
decoding gives the eager tokens."""

from __future__ import annotations

import shutil

import pytest
import torch

from dlm.decoding.engine import generate
from dlm.decoding.layout import Layout
from dlm.decoding.runner import Runner
from dlm.decoding.text import left_pad
from dlm.settings import DecodeConfig
from dlm.tensor import patterns
from tests.conftest import make_backbone, sharp_backbone


def block(size: int) -> patterns.Pattern:
    return patterns.get("block", block_size=size)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_backbone("qwen3", tokenizer, dtype=torch.float64).model.eval()


def setup(model, cache="static", use_cache=True):
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    layout = Layout.build(torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]), max_new_tokens=4, pattern=block(2))
    return ids, Runner(model, layout, DecodeConfig(block_size=2, max_new_tokens=4, cache=cache, use_cache=use_cache))


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_cached_block_passes_give_the_logits_of_a_full_forward(model, cache):
    ids, run = setup(model, cache)
    _, full = setup(model, use_cache=False)
    with torch.inference_mode():
        reference = full(ids, 0, 10, 0)
        run(ids, 0, 6, 1, first=True)
        first = run(ids, 6, 8, 2)  # block 1
        assert run.keep_until(6) == 6 and run.length == 6
        again = run(ids, 6, 8, 2)  # a second pass over the same block
        run.keep_until(6)
        fold_in = run(ids, 6, 10, torch.tensor([2, 3]))  # the completed block enters with the next one
    torch.testing.assert_close(first, reference[:, 6:8])
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(fold_in, reference[:, 8:10])


def test_the_block_mask_is_built_once_and_sliced_by_later_passes(model):
    ids, run = setup(model)
    first = run.mask(6, 10)
    later = run.mask(8, 10)
    assert later.data_ptr() == first[:, :, 2:].data_ptr()  # a view, not a new mask
    assert first.shape == (2, 1, 4, 10)  # static cache: queries over every key slot


def test_a_blocks_later_passes_slice_its_first_pass_mask_and_a_new_block_builds_its_own(model):
    _, run = setup(model)
    first = run.mask(4, 8, (6, 8))  # the completed block 4:6 folded into block 6:8's first pass
    later = run.mask(6, 8, (6, 8))
    assert later.data_ptr() == first[:, :, 2:].data_ptr()
    assert torch.equal(first, run.layout.mask(4, 8, 10, (6, 8)))
    assert run.mask(6, 10, (8, 10)).data_ptr() != first.data_ptr()  # the next block: another noisy group


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_one_token_steps_slice_one_mask_built_for_many_rows(model, cache):
    """The AR loop's steps: one mask for up to MASK_ROWS query rows, each step a view of it, equal to a mask
    built for that step alone (over every slot of a static cache, over the tokens so far otherwise)."""
    ids, run = setup(model, cache)
    steps = [run.mask(q, q + 1) for q in range(6, 10)]
    assert len({m.untyped_storage().data_ptr() for m in steps}) == 1
    for q, m in zip(range(6, 10), steps):
        assert torch.equal(m, run.layout.mask(q, q + 1, 10 if cache == "static" else q + 1))


def test_logits_only_for_the_positions_asked(model):
    ids, run = setup(model)
    with torch.inference_mode():
        run(ids, 0, 6, 1, first=True)
        out = run(ids, 6, 10, torch.tensor([3]))
    assert out.shape[:2] == (2, 1)


def test_a_subset_of_rows_gets_the_logits_the_whole_batch_gives_it(model):
    ids, run = setup(model)
    with torch.inference_mode():
        run(ids, 0, 6, 1, first=True)
        both = run(ids, 6, 8, 2)
        run.keep_until(6)
        one = run.subset(torch.tensor([1]), ids, 6, 8, 2)
        assert run.length == 6  # the shared cache is untouched
        run.select(torch.tensor([1]))
        after = run(ids[1:], 6, 8, 2)
    torch.testing.assert_close(one, both[1:])
    torch.testing.assert_close(after, both[1:])


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
def test_compiled_decoding_gives_the_eager_tokens(tokenizer):
    """decode.compile: the prompt's pass runs eager, every later pass compiled; same tokens in every mode. The
    no-cache reference (a new shape every pass) runs eager: nothing is compiled for it."""
    bb = sharp_backbone("qwen3", tokenizer)
    ids, mask = left_pad([tokenizer.encode(p) for p in ["Tom has 3 apples and", "Q: 12 + 7 ="]], 0)
    run = lambda **kw: generate(bb.model, ids, attention_mask=mask, mask_token_id=bb.mask_token_id,  # noqa: E731
                                block_size=4, max_new_tokens=8, threshold=0.3, **kw)
    torch._dynamo.utils.counters.clear()
    assert run(use_cache=False, compile=True).tokens == run(use_cache=False).tokens
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == 0
    for mode in ("diffusion", "ar", "speculative"):
        compiled, eager = run(mode=mode, compile=True), run(mode=mode)
        assert compiled.tokens == eager.tokens and compiled.nfe == eager.nfe, mode
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > 0
