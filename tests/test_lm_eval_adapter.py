"""The lm-eval `dlm` model: exact scoring against direct forwards, generation limits, registry, errors."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry

from dlm.attention import block_causal
from dlm.checkpoint import CheckpointMeta, save_checkpoint
from dlm.config import ConfigError
from dlm.lm_eval_adapter import DLMEvalModel, diffusion_rows
from tests.conftest import make_backbone

CONTEXT = "Question: Tom has 3 apples. Tom finds 4 more. How many apples does Tom have now?\nAnswer:"
CONTINUATIONS = [" A", " B", " 7", " Tom has 3 + 4 = 7 apples.\n#### 7"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many small forwards: one thread is faster on the shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bb(tokenizer):
    """float64, so padding noise cannot flip an argmax between batched and single runs; the lm_head is
    sharpened x30 because this seed's near-uniform model would emit EOS first (empty generations)."""
    backbone = make_backbone("qwen3", tokenizer, dtype=torch.float64)
    with torch.no_grad():
        backbone.model.lm_head.weight.mul_(30.0)
    return backbone


def adapter(bb, pattern="block_clean", shift=False, **kwargs) -> DLMEvalModel:
    meta = CheckpointMeta(pattern, 4, "<|mask|>", bb.mask_token_id, shift)
    return DLMEvalModel(backbone=bb, meta=meta, **kwargs)


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, idx=i) for i, pair in enumerate(pairs)]


def gen_requests(contexts, **gen_kwargs):
    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), idx=i) for i, c in enumerate(contexts)]


def log_probs(model, ids, block_ids, mask_id):
    """Decoder distribution at every position of one sequence under the block-causal rule."""
    blk = torch.tensor(block_ids)
    mask = block_causal(blk[:, None], blk[None, :])[None, None]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=mask,
                       position_ids=torch.arange(len(ids))[None]).logits[0]
    logits[:, mask_id] = -torch.inf
    return logits.log_softmax(-1)


def step_by_step(bb, ctx, cont, *, block_size=4, shift=False):
    """The chain rule with one forward per continuation token: ctx + cont[:i] + [MASK] to the block end."""
    p, first, total, greedy = len(ctx), -(-len(ctx) // block_size), 0.0, True
    for i in range(len(cont)):
        end = min((i // block_size + 1) * block_size, len(cont))
        ids = ctx + cont[:i] + [bb.mask_token_id] * (end - i)
        blocks = [q // block_size for q in range(p)] + [first + j // block_size for j in range(end)]
        lp = log_probs(bb.model, ids, blocks, bb.mask_token_id)[p + i - 1 if shift else p + i]
        total += float(lp[cont[i]])
        greedy &= int(lp.argmax()) == cont[i]
    return total, greedy


def test_single_token_continuation_is_the_log_softmax_at_the_masked_position(bb, tokenizer):
    lm = adapter(bb)
    ctx = tokenizer.encode(CONTEXT)
    p = len(ctx)
    direct = log_probs(bb.model, ctx + [bb.mask_token_id], [q // 4 for q in range(p)] + [-(-p // 4)], bb.mask_token_id)[p]
    for token in (tokenizer.encode(" 7")[-1], int(direct.argmax())):
        (lp, greedy), = lm._loglikelihood_tokens([(("", ""), ctx, [token])])  # ids: no re-tokenization
        assert lp == pytest.approx(float(direct[token]), abs=1e-5)
        assert greedy == (token == int(direct.argmax()))


@pytest.mark.parametrize("shift", [False, True])
def test_chain_rule_in_one_forward_matches_one_forward_per_token(bb, tokenizer, shift):
    lm = adapter(bb, shift=shift, batch_size=3)
    ctx = tokenizer.encode(CONTEXT)
    conts = [tokenizer.encode(c) for c in CONTINUATIONS]
    got = lm._score([(ctx, c) for c in conts], disable_tqdm=True)
    for cont, (lp, greedy) in zip(conts, got):
        want, want_greedy = step_by_step(bb, ctx, cont, shift=shift)
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_long_continuations_split_into_rows_without_changing_the_score(bb, tokenizer):
    ctx, cont = tokenizer.encode(CONTEXT), tokenizer.encode(CONTINUATIONS[-1])
    rows = diffusion_rows(ctx, cont, block_size=4, mask_token_id=bb.mask_token_id, shift=False, max_length=40)
    assert len(rows) > 1 and all(sum(s > 0 for s in r.segment) <= 40 for r in rows)
    assert sum(len(r.targets) for r in rows) == len(cont)
    (lp, _), = adapter(bb, max_length=40)._score([(ctx, cont)], disable_tqdm=True)
    kept = ctx[-(40 - len(cont)):]  # the context's left end is dropped to fit max_length positions
    assert lp == pytest.approx(step_by_step(bb, kept, cont)[0], abs=1e-4)


def test_ar_checkpoint_scores_with_the_plain_causal_forward(bb, tokenizer):
    lm = adapter(bb, pattern="causal")
    ctx, cont = tokenizer.encode(CONTEXT), tokenizer.encode(CONTINUATIONS[-1])
    with torch.no_grad():
        logits = bb.model(input_ids=torch.tensor([ctx + cont])).logits[0]  # HF's own causal mask
    want = logits.log_softmax(-1)[len(ctx) - 1:-1].gather(-1, torch.tensor(cont)[:, None]).sum()
    (lp, _), = lm.loglikelihood(ll_requests([(CONTEXT, CONTINUATIONS[-1])]))
    assert lp == pytest.approx(float(want), abs=1e-4)


@pytest.mark.parametrize("pattern", ["block_clean", "causal"])
def test_rolling_loglikelihood_of_a_short_text_is_its_score_after_the_prefix_token(bb, pattern):
    lm = adapter(bb, pattern=pattern)
    text = CONTINUATIONS[-1].strip()
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), idx=0)])
    (lp, _), = lm.loglikelihood(ll_requests([("", text)]))
    assert rolling == pytest.approx(lp, abs=1e-4)
    long_text = " ".join([text] * 12)  # > max_length: several windows
    (total,) = adapter(bb, pattern=pattern, max_length=48).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (long_text,), idx=0)])
    assert total < rolling < 0


def generated_tokens(lm, context, **gen_kwargs) -> tuple[str, int]:
    before = lm.stats["generated_tokens"]
    (text,) = lm.generate_until(gen_requests([context], **gen_kwargs))
    return text, lm.stats["generated_tokens"] - before


@pytest.mark.parametrize("pattern", ["block_clean", "causal"])
def test_generation_honours_max_gen_toks_and_until(bb, tokenizer, pattern):
    lm = adapter(bb, pattern=pattern)
    long, n_long = generated_tokens(lm, CONTEXT, max_gen_toks=12, until=[])
    short, n_short = generated_tokens(lm, CONTEXT, max_gen_toks=8, until=[])
    assert (n_short, n_long) == (8, 12)
    assert long.startswith(short)  # blocks are decoded left to right: the first 8 tokens do not change
    # a stop string that starts on a token boundary: the text before it is kept whole
    tokens = tokenizer.encode(long)
    heads = [tokenizer.decode(tokens[:k]) for k in range(3, 9)]
    head = next(h for h in heads if long.startswith(h) and long.find(long[len(h):len(h) + 3]) == len(h))
    stop = long[len(head):len(head) + 3]
    cut, _ = generated_tokens(lm, CONTEXT, max_gen_toks=12, until=[stop])
    assert cut == head == long.split(stop)[0]


@pytest.mark.parametrize("pattern", ["block_clean", "causal"])
def test_batch_of_four_gives_the_same_outputs_and_scores_as_one_at_a_time(bb, pattern):
    contexts = [CONTEXT, "Question: Mia has 12 pens.\nAnswer:", "x", CONTEXT[:40]]
    one, four = adapter(bb, pattern=pattern, batch_size=1), adapter(bb, pattern=pattern, batch_size=4)
    reqs = gen_requests(contexts, max_gen_toks=10, until=["Question:"])
    assert one.generate_until(reqs) == four.generate_until(reqs)
    pairs = ll_requests([(c, k) for c in contexts for k in CONTINUATIONS[:3]])
    for (lp1, g1), (lp4, g4) in zip(one.loglikelihood(pairs), four.loglikelihood(pairs)):
        assert lp1 == pytest.approx(lp4, abs=1e-5) and g1 == g4


def test_decoder_knobs_come_from_model_args_over_the_checkpoint_defaults(bb):
    lm = adapter(bb, threshold="0.5", gen_length="32", sub_block_size=2, use_cache="false")
    d = lm.decode
    assert (d.block_size, d.threshold, d.max_new_tokens, d.sub_block_size, d.use_cache) == (4, 0.5, 32, 2, False)
    assert adapter(bb, block_size=8).decode.block_size == 8


def test_chat_template_is_applied_from_the_tokenizer(bb):
    lm = adapter(bb)
    with pytest.raises(ConfigError, match="has no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    bb.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                                 "{% if add_generation_prompt %}<assistant>{% endif %}"
    try:
        assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    finally:
        bb.tokenizer.chat_template = None


def test_registry_resolves_dlm_and_still_the_builtin_models():
    assert get_model("dlm") is DLMEvalModel
    assert {"hf", "vllm", "dummy"} <= set(model_registry.keys())
    assert get_model("dummy").__name__ == "DummyLM"


def test_unknown_model_args_key_fails_in_one_line_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"^model_args.blok_size=4: unknown key \(did you mean 'block_size'\?\); allowed: "):
        DLMEvalModel.create_from_arg_string(f"pretrained={tmp_path},blok_size=4")


@pytest.mark.parametrize(("args", "message"), [
    ("threshold=high", r"^model_args.threshold='high': must be float$"),
    ("threshold=1.5", r"^decode.threshold=1.5: must be in \(0, 1\]$"),
    ("batch_size=auto", r"^batch_size='auto': must be a positive integer"),
])
def test_bad_model_args_values_fail_in_one_line(bb, tokenizer, tmp_path, args, message):
    meta = CheckpointMeta("block_clean", 4, "<|mask|>", bb.mask_token_id)
    save_checkpoint(bb.model, tokenizer, meta, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=message):
        DLMEvalModel.create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},{args}")


def test_checkpoint_without_dlm_yaml_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint=.*: no dlm.yaml; not a dlm checkpoint"):
        DLMEvalModel(str(tmp_path))


def test_generation_kwargs_it_cannot_honour_fail_in_one_line(bb):
    with pytest.raises(ConfigError, match=r"^gen_kwargs.top_k=5: not supported by the dlm model; allowed: until, "):
        adapter(bb).generate_until(gen_requests([CONTEXT], top_k=5))
    with pytest.raises(ConfigError, match=r"^max_gen_toks=256: leaves no room for the prompt in max_length=256"):
        adapter(bb).generate_until(gen_requests([CONTEXT], max_gen_toks=256))
