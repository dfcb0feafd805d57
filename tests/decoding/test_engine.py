from __future__ import annotations

import pytest
import torch

from dlm.decoding.engine import generate
from dlm.decoding.text import left_pad
from dlm.settings import ConfigError
from tests.conftest import make_backbone, sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Tom has 3 apples and", "Q: 12 + 7 =", "Sara buys 4 pens. She gives 2 away. How many", "x"]


@pytest.fixture(scope="module")
def qwen(tokenizer):
    return sharp_backbone("qwen3", tokenizer)


def encode(tokenizer, prompts):
    """Left-padded batch: (input_ids, attention_mask)."""
    return left_pad([tokenizer.encode(p) for p in prompts], 0)


def run(bb, prompts, **kwargs):
    ids, mask = encode(bb.tokenizer, prompts)
    kwargs.setdefault("threshold", 0.3)
    return generate(bb.model, ids, attention_mask=mask, mask_token_id=bb.mask_token_id, **kwargs)


def recorded_inputs(model):
    """Every forward's input_ids, observed with a pre-hook (the model itself is untouched)."""
    seen = []
    hook = lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone())  # noqa: E731
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


# --- exactness: cache vs none, batch vs single, eager vs sdpa ---------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("block_size", [2, 3, 4])
def test_cached_equals_uncached(qwen, block_size, shift):
    # prompt lengths 8 and 9: block 3 divides neither, block 2 and 4 only one; a padded row too
    kwargs = dict(block_size=block_size, shift=shift, max_new_tokens=14)
    cached = run(qwen, PROMPTS[:2], **kwargs)
    uncached = run(qwen, PROMPTS[:2], use_cache=False, **kwargs)
    assert cached.tokens == uncached.tokens
    assert cached.nfe == uncached.nfe
    assert cached.tokens_per_forward > 1  # parallel commits really happened
    assert cached.nfe > -(-14 // block_size)  # ... and so did passes committing a single token


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_batched_left_padded_equals_one_at_a_time(tokenizer, arch, shift):
    bb = sharp_backbone(arch, tokenizer)
    batch = run(bb, PROMPTS, block_size=3, shift=shift, max_new_tokens=12, threshold=0.15)
    alone = [run(bb, [p], block_size=3, shift=shift, max_new_tokens=12, threshold=0.15).tokens[0] for p in PROMPTS]
    assert batch.tokens == alone
    assert batch.tokens_per_forward > 1


def test_eager_equals_sdpa(tokenizer, qwen):
    eager = sharp_backbone("qwen3", tokenizer, attn_implementation="eager")
    kwargs = dict(block_size=4, max_new_tokens=12)
    assert run(eager, PROMPTS[:3], **kwargs).tokens == run(qwen, PROMPTS[:3], **kwargs).tokens


# --- the commit rules ---------------------------------------------------------------------------------------


def test_one_token_per_forward_commits_exactly_one_per_forward(qwen):
    out = run(qwen, PROMPTS[:2], block_size=4, max_new_tokens=10, one_token_per_forward=True)
    assert out.nfe == 10 == out.num_generated[0] == out.num_generated[1]


def test_lower_threshold_needs_fewer_forwards(qwen):
    strict = run(qwen, PROMPTS[:1], block_size=4, max_new_tokens=16, threshold=1.0)
    loose = run(qwen, PROMPTS[:1], block_size=4, max_new_tokens=16, threshold=0.2)
    assert strict.nfe == 16  # nothing reaches 1.0: one (forced) commit per pass
    assert loose.nfe < strict.nfe


def test_sub_blocks_commit_only_in_first_incomplete_sub_block(qwen):
    seen, hook = recorded_inputs(qwen.model)
    try:
        out = run(qwen, PROMPTS[:1], block_size=8, sub_block_size=4, threshold=0.05, max_new_tokens=16)
    finally:
        hook.remove()
    mask_id, final = qwen.mask_token_id, torch.tensor(out.tokens[0])
    befores = [ids[0, -8:] for ids in seen]  # the block before each pass (the first also feeds the prompt)
    block = -1
    sizes = []
    for i, before in enumerate(befores):
        block += bool((before == mask_id).all())  # a fresh block starts all [MASK]
        block_done = i + 1 == len(befores) or bool((befores[i + 1] == mask_id).all())
        after = final[8 * block : 8 * block + 8] if block_done else befores[i + 1]
        committed = ((before == mask_id) & (after != mask_id)).nonzero().flatten()
        first_masked = int((before == mask_id).nonzero()[0])
        assert len(committed) >= 1
        assert (committed // 4 == first_masked // 4).all(), (i, before, after)
        sizes.append(len(committed))
    assert len(sizes) == out.nfe
    assert max(sizes) > 1  # several commits in one pass, yet never across the sub-block boundary


def test_factor_policy_decodes_in_parallel(qwen):
    out = run(qwen, PROMPTS[:2], block_size=4, max_new_tokens=12, policy="factor", factor=2.0)
    assert out.tokens_per_forward > 1


def test_sampling_is_reproducible_with_a_generator(qwen):
    sample = lambda seed: run(qwen, PROMPTS[:2], block_size=4, max_new_tokens=8, temperature=0.8,  # noqa: E731
                              top_p=0.9, generator=torch.Generator().manual_seed(seed)).tokens
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


# --- stopping -------------------------------------------------------------------------------------------------


def test_eos_ends_the_row_after_its_block_without_early_exit(qwen):
    full = run(qwen, PROMPTS[2:3], block_size=4, max_new_tokens=16)
    tokens = full.tokens[0]
    eos = tokens[5]  # a token generated in block 1 (positions 4..7); maybe also later
    first = tokens.index(eos)
    out = run(qwen, PROMPTS[2:3], block_size=4, max_new_tokens=16, eos_token_id=[eos], early_exit=False)
    assert out.tokens[0] == tokens[: first + 1]  # EOS kept, the rest dropped
    until_block = run(qwen, PROMPTS[2:3], block_size=4, max_new_tokens=4 * (first // 4 + 1))
    assert out.nfe == until_block.nfe < full.nfe  # stopped once that block was complete
    assert out.raw_lengths == [4 * (first // 4 + 1)]


def test_early_exit_stops_mid_block_once_nothing_before_eos_is_masked(qwen):
    one = dict(block_size=8, max_new_tokens=16, one_token_per_forward=True)  # one commit per pass: countable
    full = run(qwen, PROMPTS[2:3], **one)
    tokens = full.tokens[0]
    eos = tokens[9]  # in block 1 (positions 8..15)
    first = tokens.index(eos)
    late = run(qwen, PROMPTS[2:3], eos_token_id=[eos], early_exit=False, **one)
    early = run(qwen, PROMPTS[2:3], eos_token_id=[eos], **one)
    assert early.tokens == late.tokens == [tokens[: first + 1]]  # the same answer ...
    assert late.nfe == 8 * (first // 8 + 1)  # ... where finishing the block costs every pass of it
    assert early.nfe < late.nfe
    assert early.raw_lengths[0] == 8 * (first // 8 + 1)  # stopped inside that block


def test_finished_rows_leave_the_batch_and_complete_blocks_sit_out(qwen):
    """A row takes part in exactly the forwards it needs alone: it leaves at EOS, and sits out the passes
    others still need for a block it has completed. Its tokens are what it decodes alone."""
    one = dict(block_size=4, max_new_tokens=16, threshold=0.3)
    alone = [run(qwen, [p], **one).tokens[0] for p in PROMPTS]
    eos = alone[1][1]  # row 1 ends at its second token
    batch = run(qwen, PROMPTS, eos_token_id=[eos], **one)
    singles = [run(qwen, [p], eos_token_id=[eos], **one) for p in PROMPTS]
    assert batch.tokens == [s.tokens[0] for s in singles]
    assert batch.row_forwards == [s.nfe for s in singles]
    assert batch.row_forwards[1] < max(batch.row_forwards) == batch.nfe
    seen, hook = recorded_inputs(qwen.model)
    run(qwen, PROMPTS, eos_token_id=[eos], **one)
    hook.remove()
    assert min(x.shape[0] for x in seen) < len(PROMPTS)  # later forwards ran without the finished row


def test_eos_in_one_row_does_not_stop_the_batch(qwen):
    full = run(qwen, PROMPTS[1:3], block_size=4, max_new_tokens=12)
    eos = next(t for t in full.tokens[0][:4] if t not in full.tokens[1])
    out = run(qwen, PROMPTS[1:3], block_size=4, max_new_tokens=12, eos_token_id=eos)
    assert out.tokens[0] == full.tokens[0][: full.tokens[0].index(eos) + 1]
    assert out.tokens[1] == full.tokens[1]


def test_stop_string_truncates_before_it(qwen, tokenizer):
    full = run(qwen, PROMPTS[:1], block_size=4, max_new_tokens=16)
    text = tokenizer.decode(full.tokens[0])
    assert " eggs" in text
    out = run(qwen, PROMPTS[:1], block_size=4, max_new_tokens=16, stop=[" eggs"], tokenizer=tokenizer)
    kept = out.tokens[0]
    assert kept == full.tokens[0][: len(kept)]
    assert " eggs" not in tokenizer.decode(kept)
    assert " eggs" in tokenizer.decode(full.tokens[0][: len(kept) + 1])


def test_uneven_max_new_tokens_cuts_the_last_block(qwen):
    out = run(qwen, PROMPTS[:2], block_size=4, max_new_tokens=10)
    assert out.num_generated == [10, 10]
    assert out.tokens == [t[:10] for t in run(qwen, PROMPTS[:2], block_size=4, max_new_tokens=10,
                                              use_cache=False).tokens]


# --- errors before any forward -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=1.5), r"^decode\.threshold=1\.5: must be in \(0, 1\]$"),
        (dict(threshold=0.0), r"decode\.threshold=0\.0: must be in \(0, 1\]"),
        (dict(block_size=0), r"decode\.block_size=0: must be a positive integer"),
        (dict(block_size=4, sub_block_size=3), r"decode\.sub_block_size=3: must divide decode\.block_size=4; "
                                               r"allowed: 1, 2, 4"),
        (dict(temperature=-1.0), r"decode\.temperature=-1\.0: must be >= 0"),
        (dict(top_p=0.0), r"decode\.top_p=0\.0: must be in \(0, 1\]"),
        (dict(top_p=1.5), r"decode\.top_p=1\.5: must be in \(0, 1\]"),
        (dict(policy="greedy"), r"decode\.policy='greedy': unknown policy; allowed: threshold, factor, fixed$"),
        (dict(thresold=0.5), r"decode\.thresold: unknown key; allowed: mode, block_size, threshold"),
        (dict(max_new_tokens=250), r"decode\.max_new_tokens=250: prompt length 9 \+ 250 = 259 exceeds "
                                   r"model\.config\.max_position_embeddings=256"),
        (dict(stop=["x"], max_new_tokens=8), r"stop=\['x'\]: stop strings need the tokenizer"),
    ],
)
def test_bad_input_is_one_line_config_error(qwen, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        run(qwen, PROMPTS[:2], **kwargs)
    assert "\n" not in str(err.value)


def test_right_padding_is_rejected(qwen):
    ids, mask = encode(qwen.tokenizer, PROMPTS[:2])
    with pytest.raises(ConfigError, match="must be left-padded"):
        generate(qwen.model, ids, attention_mask=mask.flip(1), mask_token_id=qwen.mask_token_id)


def test_flex_model_is_told_to_load_with_sdpa(tokenizer):
    bb = make_backbone("qwen3", tokenizer, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*"
                                         "load the model with attn_implementation='sdpa'"):
        run(bb, PROMPTS[:1])


# --- the engine's economies: static cache, logits only where needed ---------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
def test_static_cache_gives_the_tokens_of_the_dynamic_one(qwen, shift):
    kwargs = dict(block_size=3, shift=shift, max_new_tokens=13, threshold=0.2)
    static = run(qwen, PROMPTS, cache="static", **kwargs)
    dynamic = run(qwen, PROMPTS, cache="dynamic", **kwargs)
    assert static.tokens == dynamic.tokens and static.row_forwards == dynamic.row_forwards


def test_lm_head_runs_only_on_positions_still_masked(qwen):
    rows_in = []
    hook = qwen.model.lm_head.register_forward_hook(lambda m, args, out: rows_in.append(args[0].shape[1]))
    try:
        out = run(qwen, PROMPTS[:1], block_size=4, max_new_tokens=8, one_token_per_forward=True)
    finally:
        hook.remove()
    # block 1 (its first pass also feeds the prompt): 4, 3, 2, 1 masked; block 2 (its first pass folds block 1
    # in): 4, 3, 2, 1
    assert rows_in == [4, 3, 2, 1, 4, 3, 2, 1] and out.nfe == 8
