"""Self-speculative decoding: the acceptance rule, and greedy speculative output == the AR mode's, token for
token, on a batch of mixed-length prompts (with EOS and stop strings)."""

from __future__ import annotations

import pytest
import torch

from dlm.decoding.engine import generate
from dlm.decoding.speculative import accept, accepted_counts
from dlm.decoding.text import left_pad
from dlm.settings import ConfigError, DecodeConfig
from tests.conftest import sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

FORMS = ["fused", "separate"]
PROMPTS = ["Tom has 3 apples and", "Q: 12 + 7 =", "Sara buys 4 pens. She gives 2 away. How many", "x"]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def bb(request, tokenizer):
    return sharp_backbone(request.param, tokenizer)


def _batch(tokenizer, prompts=PROMPTS):
    return left_pad([tokenizer.encode(p) for p in prompts], 0)


def _decode(bb, ids, mask, mode, **kw):
    return generate(bb.model, ids, attention_mask=mask, mask_token_id=bb.mask_token_id, mode=mode,
                    max_new_tokens=kw.pop("max_new_tokens", 19), **kw)


def test_all_right_draft_accepts_k_plus_one():
    verified = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    n, tokens = accept(verified[:, :3].clone(), verified)
    assert n == 3 and torch.equal(tokens, verified)  # k drafts + the causal next token


def test_all_wrong_draft_still_gives_one_token_per_verify():
    verified = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    n, tokens = accept(verified[:, :3] + 100, verified)
    assert n == 0 and torch.equal(tokens, verified[:, :1])


def test_rows_accept_their_longest_common_prefix_and_the_batch_its_minimum():
    verified = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    draft = torch.tensor([[5, 6, 0], [1, 9, 3]])  # row 0 agrees on 2, row 1 on 1 (a later match does not count)
    assert accepted_counts(draft, verified).tolist() == [2, 1]
    n, tokens = accept(draft, verified)
    assert n == 1 and tokens.tolist() == [[5, 6], [1, 2]]  # row 0's 2nd token: its draft == its causal token


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_speculative_equals_ar_mode_on_mixed_length_prompts(bb, tokenizer, block_size, form):
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar")
    spec = _decode(bb, ids, mask, "speculative", block_size=block_size, speculative_form=form)
    assert spec.tokens == ar.tokens and all(len(t) == 19 for t in spec.tokens)
    if form == "separate":
        steps = (spec.nfe - 1) // 2
        assert spec.nfe == 1 + 2 * steps and steps <= 18  # prefill + draft and verify per step, >= 1 token each
    else:
        assert spec.nfe <= 19  # prefill + one forward per step, >= 1 token each


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_speculative_equals_ar_with_eos_and_stop_strings(bb, tokenizer, cache, form):
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar")
    eos = ar.tokens[0][6]
    stop = tokenizer.decode(ar.tokens[2][8:10])
    kw = dict(eos_token_id=eos, stop=[stop], tokenizer=tokenizer, cache=cache)
    expected = _decode(bb, ids, mask, "ar", **kw)
    got = _decode(bb, ids, mask, "speculative", block_size=4, speculative_form=form, **kw)
    assert got.tokens == expected.tokens
    assert len(got.tokens[0]) <= 7 and got.tokens[0][-1] == eos
    assert stop not in tokenizer.decode(got.tokens[2])
    assert max(got.row_forwards) == got.nfe and min(got.row_forwards) < got.nfe  # finished rows left early


@pytest.mark.parametrize("form", FORMS)
def test_one_prompt_alone_equals_its_row_in_the_batch(bb, tokenizer, form):
    ids, mask = _batch(tokenizer)
    batch = _decode(bb, ids, mask, "speculative", block_size=4, speculative_form=form)
    one_ids, one_mask = _batch(tokenizer, PROMPTS[1:2])
    alone = _decode(bb, one_ids, one_mask, "speculative", block_size=4, speculative_form=form)
    assert alone.tokens[0] == batch.tokens[1]


@pytest.mark.parametrize("kw,match", [
    (dict(block_size=1), r"^decode.block_size=1: must be >= 2 with decode.mode=speculative"),
    (dict(use_cache=False), r"^decode.use_cache=False: decode.mode=speculative verifies over the KV cache"),
    (dict(temperature=0.5), r"^decode.temperature=0.5: decode.mode=speculative is greedy"),
    (dict(speculative_form="both"), r"^decode.speculative_form='both': .*allowed: fused, separate"),
])
def test_bad_speculative_settings_fail_in_one_line(kw, match):
    with pytest.raises(ConfigError, match=match):
        DecodeConfig(mode="speculative", **kw)


def test_speculative_needs_the_mask_token(bb, tokenizer):
    ids, mask = _batch(tokenizer)
    with pytest.raises(ConfigError, match=r"^mask_token_id=None: decode.mode=speculative needs the \[MASK\]"):
        generate(bb.model, ids, attention_mask=mask, mode="speculative")


def _oracle(ar_seq: torch.Tensor, wrong_every: int):
    """A draft from the AR mode's own output, wrong at one column every `wrong_every` steps: drafts that the
    verify accepts in part or in full, so the cache is cropped after accepted drafts on a real model."""

    def draft(run, seq, pos, k, mask_token_id, shift=False):
        guess = ar_seq[:, pos + 1:pos + k + 1].clone()
        if pos % wrong_every == 0:
            guess[:, k // 2] = mask_token_id  # never a causal argmax
        return guess

    return draft


def _fused_oracle(ar_seq: torch.Tensor, wrong_every: int):
    """The same oracle in place of the fused form's noisy-block draft (for positions `first..`); with
    `wrong_every == 1` every draft token is wrong."""

    def draft(logits, first, mask_token_id):
        guess = ar_seq[:, first:first + logits.shape[1]].clone()
        if wrong_every == 1:
            guess[:] = mask_token_id
        elif first % wrong_every == 0 and guess.shape[1]:
            guess[:, guess.shape[1] // 2] = mask_token_id
        return guess

    return draft


def _with_oracle(bb, tokenizer, monkeypatch, form: str, wrong_every: int):
    """(speculative, AR) outputs, 21 tokens at block 5, with the drafts of `form` replaced by the oracle."""
    import dlm.decoding.speculative as speculative

    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar", max_new_tokens=21)
    ar_seq = torch.cat([ids, torch.tensor(ar.tokens)], dim=1)
    if form == "separate":
        monkeypatch.setattr(speculative, "draft_tokens", _oracle(ar_seq, wrong_every))
    else:
        monkeypatch.setattr(speculative, "noisy_draft", _fused_oracle(ar_seq, wrong_every))
    return _decode(bb, ids, mask, "speculative", block_size=5, max_new_tokens=21, speculative_form=form), ar


@pytest.mark.parametrize("wrong_every", [1, 2, 10**6])
def test_accepted_drafts_keep_the_output_and_cut_the_forwards(bb, tokenizer, monkeypatch, wrong_every):
    spec, ar = _with_oracle(bb, tokenizer, monkeypatch, "separate", wrong_every)
    assert spec.tokens == ar.tokens
    if wrong_every == 10**6:  # always right: k + 1 = 5 tokens per verify, 20 after the prefill's first one
        assert spec.nfe == 1 + 2 * 4
    else:
        assert 1 + 2 * 4 < spec.nfe < 1 + 2 * 20


@pytest.mark.parametrize("wrong_every", [1, 2, 10**6])
def test_fused_form_accepts_a_whole_block_per_forward_when_the_drafts_are_right(bb, tokenizer, monkeypatch,
                                                                              wrong_every):
    spec, ar = _with_oracle(bb, tokenizer, monkeypatch, "fused", wrong_every)
    assert spec.tokens == ar.tokens
    if wrong_every == 10**6:  # prefill: token 1; a draft-only step: token 2; then 5 a forward (19 in 4)
        assert spec.nfe == 1 + 1 + 4
    elif wrong_every == 1:  # every draft all wrong: still one token per forward, as AR
        assert spec.nfe == 21
    else:
        assert 6 < spec.nfe < 21


@pytest.mark.parametrize("form,nfe", [("separate", 1 + 2 * 3), ("fused", 1 + 1 + 3)])
def test_a_context_free_model_drafts_right_and_accepts_k_plus_one_per_verify(tokenizer, form, nfe):
    bb = sharp_backbone("qwen3", tokenizer)
    with torch.no_grad():  # every token embeds alike: every position predicts the same token, drafts included
        emb = bb.model.get_input_embeddings().weight
        emb.copy_(emb[:1].expand_as(emb))
    ids, mask = _batch(tokenizer)
    spec = _decode(bb, ids, mask, "speculative", block_size=4, max_new_tokens=13, speculative_form=form)
    assert spec.tokens == _decode(bb, ids, mask, "ar", max_new_tokens=13).tokens
    assert spec.nfe == nfe and spec.tokens_per_forward == pytest.approx(13 / nfe)


@pytest.mark.parametrize("form", FORMS)
def test_shifted_checkpoints_draft_from_the_previous_row_and_still_equal_ar(bb, tokenizer, form):
    ids, mask = _batch(tokenizer)
    spec = _decode(bb, ids, mask, "speculative", block_size=4, shift=True, speculative_form=form)
    assert spec.tokens == _decode(bb, ids, mask, "ar").tokens
