"""Self-speculative decoding: the acceptance rule, and greedy speculative output == the AR mode's, token for
token, on a batch of mixed-length prompts (with EOS and stop strings)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dlm.decoding.drafting import DraftRequest, SelfDrafter
from dlm.decoding.engine import generate
from dlm.decoding.speculative import accept, accepted_counts, likely_counts
from dlm.decoding.text import left_pad
from dlm.settings import ConfigError, DecodeConfig
from tests.conftest import sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

FORMS = ["fused", "separate", "branched", "branched/2"]
"""`decode.speculative_form`, `/m`: with `speculative_branches=m`."""
PROMPTS = ["Tom has 3 apples and", "Q: 12 + 7 =", "Sara buys 4 pens. She gives 2 away. How many", "x"]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def bb(request, tokenizer):
    return sharp_backbone(request.param, tokenizer)


def _form(form: str) -> dict:
    name, _, m = form.partition("/")
    return dict(speculative_form=name, speculative_branches=int(m) if m else None)


def _batch(tokenizer, prompts=PROMPTS):
    return left_pad([tokenizer.encode(p) for p in prompts], 0)


def _decode(bb, ids, mask, mode, **kw):
    return generate(bb.model, ids, attention_mask=mask, mask_token_id=bb.mask_token_id, mode=mode,
                    max_new_tokens=kw.pop("max_new_tokens", 19), **kw)


def test_all_right_draft_accepts_k_plus_one():
    verified = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    n, nxt = accept(verified[:, :3].clone(), verified)
    assert n.tolist() == [3, 3] and nxt.tolist() == [8, 4]  # k drafts + the causal next token


def test_all_wrong_draft_still_gives_one_token_per_verify():
    verified = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    n, nxt = accept(verified[:, :3] + 100, verified)
    assert n.tolist() == [0, 0] and nxt.tolist() == [5, 1]


def test_each_row_accepts_its_own_longest_prefix_up_to_its_limit():
    verified = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    draft = torch.tensor([[5, 6, 0], [1, 9, 3]])  # row 0 agrees on 2, row 1 on 1 (a later match does not count)
    assert accepted_counts(draft, verified).tolist() == [2, 1]
    n, nxt = accept(draft, verified)
    assert n.tolist() == [2, 1] and nxt.tolist() == [7, 2]  # row 0's 3rd token: the causal one after its 2 drafts
    n, nxt = accept(draft, verified, limit=torch.tensor([1, 0]))  # rows one and two tokens from their length limit
    assert n.tolist() == [1, 0] and nxt.tolist() == [6, 1]


def test_likely_counts_rank_counts_by_the_drafts_confidences():
    conf = torch.tensor([[0.9, 0.9, 0.9], [0.1, 0.9, 0.9], [0.9, 0.5, 0.9], [0.9, 0.9, 0.9]])
    usable = torch.tensor([3, 3, 3, 1])  # row 3 has one draft (or one token left)
    # P(n) = c_1..c_n (1 - c_{n+1}): row 0 [.1 .09 .081 .729], row 1 [.9 .01 .009 .081], row 2 [.1 .45 .045 .405]
    assert likely_counts(conf, usable, 2).tolist() == [[3, 0], [0, 3], [1, 3], [1, 0]]
    assert likely_counts(conf, usable, 1).tolist() == [[3], [0], [1], [1]]


@pytest.mark.parametrize("branches", [1, 2, 3, 4, None])
def test_any_number_of_branches_equals_the_ar_mode(bb, tokenizer, branches):
    """A row that accepts a count no block was drafted after goes on as in the fused form: never a different
    token, at most one forward a step; every count drafted is the default branched form itself."""
    ids, mask = _batch(tokenizer)
    spec = _decode(bb, ids, mask, "speculative", block_size=4, speculative_form="branched",
                   speculative_branches=branches)
    assert spec.tokens == _decode(bb, ids, mask, "ar").tokens and spec.nfe <= 19
    if branches == 4:
        full = _decode(bb, ids, mask, "speculative", block_size=4, speculative_form="branched")
        assert spec.row_forwards == full.row_forwards


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_speculative_equals_ar_mode_on_mixed_length_prompts(bb, tokenizer, block_size, form):
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar")
    spec = _decode(bb, ids, mask, "speculative", block_size=block_size, **_form(form))
    assert spec.tokens == ar.tokens and all(len(t) == 19 for t in spec.tokens)
    if form == "separate":  # prefill + draft and verify per step (a row's last token: verify only), >= 1 token each
        assert spec.nfe <= 1 + 2 * 18
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
    got = _decode(bb, ids, mask, "speculative", block_size=4, **_form(form), **kw)
    assert got.tokens == expected.tokens
    assert len(got.tokens[0]) <= 7 and got.tokens[0][-1] == eos
    assert stop not in tokenizer.decode(got.tokens[2])
    assert max(got.row_forwards) == got.nfe and min(got.row_forwards) < got.nfe  # finished rows left early


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3])
def test_lengths_shorter_than_a_draft_still_equal_ar_mode(bb, tokenizer, max_new_tokens):
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar", max_new_tokens=max_new_tokens)
    spec = _decode(bb, ids, mask, "speculative", block_size=8, max_new_tokens=max_new_tokens)
    assert spec.tokens == ar.tokens and all(len(t) == max_new_tokens for t in spec.tokens)
    assert spec.nfe <= max_new_tokens


@pytest.mark.parametrize("form", FORMS)
def test_one_prompt_alone_equals_its_row_in_the_batch(bb, tokenizer, form):
    ids, mask = _batch(tokenizer)
    batch = _decode(bb, ids, mask, "speculative", block_size=4, **_form(form))
    one_ids, one_mask = _batch(tokenizer, PROMPTS[1:2])
    alone = _decode(bb, one_ids, one_mask, "speculative", block_size=4, **_form(form))
    assert alone.tokens[0] == batch.tokens[1]


@pytest.mark.parametrize("kw,match", [
    (dict(block_size=1), r"^decode.block_size=1: must be >= 2 with decode.mode=speculative"),
    (dict(use_cache=False), r"^decode.use_cache=False: decode.mode=speculative verifies over the KV cache"),
    (dict(temperature=0.5), r"^decode.temperature=0.5: decode.mode=speculative is greedy"),
    (dict(speculative_form="both"), r"^decode.speculative_form='both': .*allowed: fused, separate, branched"),
    (dict(speculative_branches=2), r"^decode.speculative_branches=2: only with decode.speculative_form=branched"),
    (dict(speculative_form="branched", speculative_branches=0), r"^decode.speculative_branches=0: must be"),
    (dict(speculative_form="branched", block_size=4, speculative_branches=5),
     r"^decode.speculative_branches=5: at most one block per acceptance count \(block_size=4\); allowed: 1, 2, 3, 4$"),
])
def test_bad_speculative_settings_fail_in_one_line(kw, match):
    with pytest.raises(ConfigError, match=match):
        DecodeConfig(mode="speculative", **kw)


def test_speculative_needs_the_mask_token(bb, tokenizer):
    ids, mask = _batch(tokenizer)
    with pytest.raises(ConfigError, match=r"^mask_token_id=None: decode.mode=speculative needs the \[MASK\]"):
        generate(bb.model, ids, attention_mask=mask, mode="speculative")


def _lookup(ar_seq: torch.Tensor, mask: torch.Tensor, first: torch.Tensor, width: int, ids: list[int]):
    """`(B, width)`: the AR-mode tokens of rows `ids` at positions `first..` (`ar_seq` = left-padded prompts + AR
    output, so position q of row r sits at column q + pads_r)."""
    cols = (first + (mask.shape[1] - mask[ids].sum(dim=1)))[:, None] + torch.arange(width)
    return ar_seq[ids].gather(1, cols.clamp(max=ar_seq.shape[1] - 1))


@dataclass
class Oracle:
    """A drafter proposing the AR mode's own output (`ar_seq` = left-padded prompts + AR output), wrong at one
    column every `wrong_every` steps (counted in draft calls for the separate form, in positions for the fused one,
    so rows are wrong at different steps); `wrong_every == 1`: every draft token wrong. `wrong_rows`: rows whose
    drafts are always wrong. Accepted in part or in full, so holes are left after accepted drafts."""

    ar_seq: torch.Tensor
    mask: torch.Tensor
    mask_token_id: int
    wrong_every: int = 10**6
    by_position: bool = True
    wrong_rows: tuple[int, ...] = ()
    noisy_pass: bool = True
    calls: int = 0
    wrong_at: int = 0
    """Non-zero: instead, the draft of every position divisible by it is wrong, whichever step drafts it."""

    def draft(self, request: DraftRequest) -> torch.Tensor:
        self.calls += 1
        guess = _lookup(self.ar_seq, self.mask, request.first, request.length, request.rows)
        if self.wrong_at:
            positions = request.first[:, None] + torch.arange(request.length)
            guess[positions % self.wrong_at == 0] = self.mask_token_id
        elif self.wrong_every == 1:
            guess[:] = self.mask_token_id
        elif guess.shape[1] and self.by_position:
            guess[request.first % self.wrong_every == 0, guess.shape[1] // 2] = self.mask_token_id
        elif guess.shape[1] and self.calls % self.wrong_every == 0:
            guess[:, request.length // 2] = self.mask_token_id  # never a causal argmax
        guess[[r in self.wrong_rows for r in request.rows]] = self.mask_token_id
        return guess


def _with_oracle(bb, tokenizer, form: str, wrong_every: int):
    """(speculative, AR) outputs, 21 tokens at block 5, the drafts proposed by the oracle."""
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar", max_new_tokens=21)
    oracle = Oracle(torch.cat([ids, torch.tensor(ar.tokens)], dim=1), mask, bb.mask_token_id, wrong_every,
                    by_position=form != "separate")
    return _decode(bb, ids, mask, "speculative", block_size=5, max_new_tokens=21, **_form(form),
                   drafter=oracle), ar


def test_each_row_advances_by_its_own_accepted_count(bb, tokenizer):
    """Row 0's drafts are always wrong, the others' always right: the others finish in the forwards they would
    take alone, while row 0 decodes one token per forward, and every row still equals the AR mode."""
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar", max_new_tokens=21)
    oracle = Oracle(torch.cat([ids, torch.tensor(ar.tokens)], dim=1), mask, bb.mask_token_id, wrong_rows=(0,))
    spec = _decode(bb, ids, mask, "speculative", block_size=5, max_new_tokens=21, drafter=oracle)
    assert spec.tokens == ar.tokens
    assert spec.row_forwards == [21, 5, 5, 5]  # 5: the prefill (token 1 and a draft), then 5 tokens a forward


@pytest.mark.parametrize("wrong_every", [1, 2, 10**6])
def test_accepted_drafts_keep_the_output_and_cut_the_forwards(bb, tokenizer, wrong_every):
    spec, ar = _with_oracle(bb, tokenizer, "separate", wrong_every)
    assert spec.tokens == ar.tokens
    if wrong_every == 10**6:  # always right: k + 1 = 5 tokens per verify, 20 after the prefill's first one
        assert spec.nfe == 1 + 2 * 4
    else:
        assert 1 + 2 * 4 < spec.nfe < 1 + 2 * 20


@pytest.mark.parametrize("wrong_every", [1, 2, 10**6])
def test_fused_form_accepts_a_whole_block_per_forward_when_the_drafts_are_right(bb, tokenizer, wrong_every):
    spec, ar = _with_oracle(bb, tokenizer, "fused", wrong_every)
    assert spec.tokens == ar.tokens
    if wrong_every == 10**6:  # prefill: token 1 and a draft of the next 4; then 5 a forward (20 in 4)
        assert spec.nfe == 1 + 4
    elif wrong_every == 1:  # every draft all wrong: still one token per forward, as AR
        assert spec.nfe == 21
    else:
        assert 5 < spec.nfe < 21


@pytest.mark.parametrize("form,nfe", [("separate", 1 + 2 * 3), ("fused", 1 + 3)])
def test_a_context_free_model_drafts_right_and_accepts_k_plus_one_per_verify(tokenizer, form, nfe):
    bb = sharp_backbone("qwen3", tokenizer)
    with torch.no_grad():  # every token embeds alike: every position predicts the same token, drafts included
        emb = bb.model.get_input_embeddings().weight
        emb.copy_(emb[:1].expand_as(emb))
    ids, mask = _batch(tokenizer)
    spec = _decode(bb, ids, mask, "speculative", block_size=4, max_new_tokens=13, **_form(form))
    assert spec.tokens == _decode(bb, ids, mask, "ar", max_new_tokens=13).tokens
    assert spec.nfe == nfe and spec.tokens_per_forward == pytest.approx(13 / nfe)


@pytest.mark.parametrize("form", FORMS)
def test_shifted_checkpoints_draft_from_the_previous_row_and_still_equal_ar(bb, tokenizer, form):
    ids, mask = _batch(tokenizer)
    spec = _decode(bb, ids, mask, "speculative", block_size=4, shift=True, **_form(form))
    assert spec.tokens == _decode(bb, ids, mask, "ar").tokens


def test_a_drafter_without_the_noisy_pass_costs_no_draft_forward(bb, tokenizer):
    """An external drafter (no noisy-block logits): the separate form runs only its verify forwards."""
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar", max_new_tokens=21)
    oracle = Oracle(torch.cat([ids, torch.tensor(ar.tokens)], dim=1), mask, bb.mask_token_id, noisy_pass=False)
    spec = _decode(bb, ids, mask, "speculative", block_size=5, max_new_tokens=21, speculative_form="separate",
                   drafter=oracle)
    assert spec.tokens == ar.tokens
    assert spec.nfe == 1 + 4  # the prefill, then 5 tokens per verify forward


@dataclass
class Recorder:
    """The model's own drafter, keeping each row's draft requests in order: (first drafted position, logits)."""

    mask_token_id: int
    noisy_pass: bool = True

    def __post_init__(self):
        self.seen: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def draft(self, request: DraftRequest) -> torch.Tensor:
        for row, first, logits in zip(request.rows, request.first.tolist(), request.logits):
            self.seen.setdefault(row, []).append((first, logits.clone()))
        return SelfDrafter(self.mask_token_id).draft(request)

    def kept_by_fused(self, k: int) -> dict[tuple[int, int], torch.Tensor]:
        """The fused form drafts before it verifies; a draft conditioned on drafts the row then rejected is dropped,
        and the row's next draft starts before `first + k + 1`. The kept ones, by (row, first)."""
        return {(row, first): logits for row, seen in self.seen.items()
                for (first, logits), (after, _) in zip(seen, seen[1:]) if after == first + k + 1}

    def every(self) -> dict[tuple[int, int], torch.Tensor]:
        return {(row, first): logits for row, seen in self.seen.items() for first, logits in seen}


def test_a_branch_drafts_what_the_fused_block_drafts_after_the_same_accepted_prefix(bb, tokenizer):
    """A branch sees the cache, `g` and the drafts its count accepted, nothing else (not the later drafts, not
    the other branches): where the fused form kept a draft from the same committed prefix, the logits are the
    same."""
    ids, mask = _batch(tokenizer)
    fused, branched = Recorder(bb.mask_token_id), Recorder(bb.mask_token_id)
    out = [_decode(bb, ids, mask, "speculative", block_size=4, max_new_tokens=25, **_form(form),
                   drafter=drafter) for form, drafter in (("fused", fused), ("branched", branched))]
    assert out[0].tokens == out[1].tokens
    kept, every = fused.kept_by_fused(3), branched.every()
    common = set(kept) & set(every)
    assert len(common) >= 4 and set(every) - set(kept)  # branched also drafts where fused had to wait a step
    for key in common:
        torch.testing.assert_close(every[key], kept[key], rtol=1e-9, atol=1e-9)


def test_fewer_branches_draft_what_every_branch_drafts_from_the_same_prefix(bb, tokenizer):
    """Each row's blocks sit after the counts chosen for it (its own positions and block ids): a row that accepted
    a chosen count drafts what the full branched form drafts after the same committed prefix (a row that did not
    asks the drafter nothing, so every recorded draft is one of these)."""
    ids, mask = _batch(tokenizer)
    full, few = Recorder(bb.mask_token_id), Recorder(bb.mask_token_id)
    out = [_decode(bb, ids, mask, "speculative", block_size=4, max_new_tokens=25, speculative_form="branched",
                   speculative_branches=m, drafter=drafter) for m, drafter in ((None, full), (2, few))]
    assert out[0].tokens == out[1].tokens
    every, chosen = full.every(), few.every()
    common = set(every) & set(chosen)
    assert len(common) >= 8
    for key in common:
        torch.testing.assert_close(chosen[key], every[key], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("wrong_at", [3, 7])
def test_branched_form_drafts_every_step_so_a_rejection_costs_no_extra_forward(bb, tokenizer, wrong_at):
    """The same positions drafted wrong in both forms: the fused form spends a forward after each rejection (no
    draft for the next step), the branched form keeps the draft of the count it accepted."""
    ids, mask = _batch(tokenizer)
    ar = _decode(bb, ids, mask, "ar", max_new_tokens=21)
    out = {}
    for form in ("fused", "branched"):
        oracle = Oracle(torch.cat([ids, torch.tensor(ar.tokens)], dim=1), mask, bb.mask_token_id, wrong_at=wrong_at)
        out[form] = _decode(bb, ids, mask, "speculative", block_size=5, max_new_tokens=21, **_form(form),
                            drafter=oracle)
    assert out["branched"].tokens == out["fused"].tokens == ar.tokens
    assert all(b < f for b, f in zip(out["branched"].row_forwards, out["fused"].row_forwards))
