"""The lm-eval `dlm` model: scoring through dlm.likelihood, generation limits, registry, errors."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry

from dlm.decoding.text import pad_token_id
from dlm.evaluation.likelihood import score_continuations
from dlm.evaluation.lm_eval_model import DLMEvalModel, rolling_windows
from dlm.models.checkpoint import CheckpointMeta
from dlm.settings import ConfigError
from dlm.tensor import patterns
from tests.conftest import save_tiny, sharp_backbone
from tests.evaluation.test_likelihood import CONTEXT, CONTINUATIONS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bb(tokenizer):
    """float64, so padding noise cannot flip an argmax between batched and single runs; the lm_head is
    sharpened x30 because this seed's near-uniform model would emit EOS first (empty generations)."""
    return sharp_backbone("qwen3", tokenizer)


def adapter(bb, pattern="block_clean", shift=False, **kwargs) -> DLMEvalModel:
    meta = CheckpointMeta(pattern, 4, "<|mask|>", bb.mask_token_id, shift)
    return DLMEvalModel(backbone=bb, meta=meta, **kwargs)


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, idx=i) for i, pair in enumerate(pairs)]


def gen_requests(contexts, **gen_kwargs):
    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), idx=i) for i, c in enumerate(contexts)]


@pytest.mark.parametrize(("pattern", "shift"), [("block_clean", False), ("block_clean", True), ("causal", False)])
def test_scores_are_dlm_likelihood_under_the_checkpoints_layout(bb, tokenizer, pattern, shift):
    lm = adapter(bb, pattern=pattern, shift=shift, block_size=8, max_length=40, batch_size=2)
    ctx, conts = tokenizer.encode(CONTEXT), [tokenizer.encode(c) for c in CONTINUATIONS]
    got = lm._loglikelihood_tokens([(("", ""), ctx, c) for c in conts])  # ids: no re-tokenization
    want = score_continuations(bb.model, [(ctx, c) for c in conts], pattern=patterns.get(pattern, block_size=8),
                               mask_token_id=bb.mask_token_id, shift=shift, max_length=40,
                               pad_token_id=pad_token_id(tokenizer), batch_size=2)
    assert got == want


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
    with pytest.raises(ConfigError, match=r"^model_args.blok_size=4: unknown key \(did you mean 'block_size'\?\); "
                                          r"allowed: "):
        DLMEvalModel.create_from_arg_string(f"pretrained={tmp_path},blok_size=4")


@pytest.mark.parametrize(("args", "message"), [
    ("threshold=high", r"^model_args.threshold='high': must be float$"),
    ("threshold=1.5", r"^decode.threshold=1.5: must be in \(0, 1\]$"),
    ("batch_size=auto", r"^batch_size='auto': must be a positive integer"),
])
def test_bad_model_args_values_fail_in_one_line(bb, tokenizer, tmp_path, args, message):
    save_tiny(bb, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=message):
        DLMEvalModel.create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},{args}")


def test_checkpoint_without_dlm_yaml_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint=.*: no dlm.yaml and no config.json"):
        DLMEvalModel(str(tmp_path))


def test_generation_kwargs_it_cannot_honour_fail_in_one_line(bb):
    with pytest.raises(ConfigError, match=r"^gen_kwargs.top_k=5: not supported by the dlm model; allowed: until, "):
        adapter(bb).generate_until(gen_requests([CONTEXT], top_k=5))
    with pytest.raises(ConfigError, match=r"^max_gen_toks=256: leaves no room for the prompt in max_length=256"):
        adapter(bb).generate_until(gen_requests([CONTEXT], max_gen_toks=256))


@pytest.mark.parametrize(("causal", "window"), [(True, 32), (False, 31)])
def test_rolling_windows_predict_every_token_once_within_max_length(causal, window):
    tokens = list(range(100, 200))
    windows = rolling_windows(tokens, prefix_token_id=7, max_length=32, causal=causal)
    assert [t for _, cont in windows for t in cont] == tokens
    assert windows[0] == ([7], tokens[:window])  # the first window is scored after the prefix token alone
    assert all(len(ctx) + len(cont) <= window + 1 and len(cont) <= window for ctx, cont in windows)


def test_truncated_prompts_are_reported_once_per_task(bb, caplog):
    lm = adapter(bb, max_length=64)
    long, short = "Question: " + "one two three " * 30, "Question: 3 + 4?"
    requests = [Instance("generate_until", {}, (c, {"max_gen_toks": 4}), idx=i, metadata=(task, i, 1))
                for i, (c, task) in enumerate([(long, "a"), (long, "a"), (short, "a"), (short, "b")])]
    full = len(lm.tok_encode(long))
    with caplog.at_level("WARNING", logger="dlm.evaluation.lm_eval_model"):
        lm.generate_until(requests, disable_tqdm=True)
        lm.generate_until(requests[:1], disable_tqdm=True)  # the same task again: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"task a: 2 of 3 prompts truncated from up to {full} tokens to their last 60 "
                        "(max_length 64 - max_gen_toks 4); raise max_length or use fewer shots"]


def test_loglikelihood_elbo_comes_from_model_args_and_bad_values_fail_in_one_line(bb, tokenizer):
    ctx = tokenizer.encode(CONTEXT)
    pairs = [(ctx, tokenizer.encode(c)) for c in CONTINUATIONS]
    lm = adapter(bb, loglikelihood="elbo", mc_num="3", seed="5")  # lm-eval hands model_args over as strings
    got = [lp for lp, _ in lm._score(pairs, disable_tqdm=True)]
    block = patterns.get("block", block_size=4)
    want = score_continuations(bb.model, pairs, pattern=block, mask_token_id=bb.mask_token_id,
                               shift=False, max_length=lm.max_length, pad_token_id=pad_token_id(tokenizer),
                               batch_size=1, method="elbo", mc_num=3, seed=5)
    assert got == pytest.approx([lp for lp, _ in want], abs=1e-9)
    assert lm.get_model_info()["loglikelihood"] == "elbo" and lm.get_model_info()["mc_num"] == 3
    with pytest.raises(ConfigError, match=r"^model_args.loglikelihood='mc': unknown method; allowed: chain, elbo$"):
        adapter(bb, loglikelihood="mc")
    with pytest.raises(ConfigError, match=r"^model_args.mc_num='0': must be a positive integer"):
        adapter(bb, loglikelihood="elbo", mc_num="0")


def test_loglikelihood_requests_that_do_not_fit_are_reported_once_per_task(bb, tokenizer, caplog):
    lm = adapter(bb, max_length=48)
    long = "Question: " + "one two three " * 20
    requests = [Instance("loglikelihood", {}, (ctx, " A"), idx=i, metadata=("mmlu_x", i, 1))
                for i, ctx in enumerate([long, "Question: 3 + 4?"])]
    full = len(lm.tok_encode(long)) + len(lm.tok_encode(" A"))
    with caplog.at_level("WARNING", logger="dlm.evaluation.lm_eval_model"):
        scored = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(scored) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"task mmlu_x: 1 of 2 prompts truncated from up to {full} tokens to their last 48 (max_length 48); "
        "raise max_length or use fewer shots"]
