"""AR decoding: `ar_generate` (transformers' own greedy `generate`) and the engine's lean AR mode, which must
give the same tokens."""

from __future__ import annotations

import pytest
import torch

from dlm.decoding.ar import ar_generate
from dlm.decoding.engine import generate
from dlm.decoding.text import left_pad
from dlm.settings import ConfigError
from tests.conftest import make_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Tom has 3 apples and", "Q: 12 + 7 =", "Sara buys 4 pens. She gives 2 away. How many", "x"]


@pytest.fixture(scope="module")
def qwen(tokenizer):
    return make_backbone("qwen3", tokenizer, dtype=torch.float64)


def encode(tokenizer, prompts):
    """Left-padded batch: (input_ids, attention_mask)."""
    return left_pad([tokenizer.encode(p) for p in prompts], 0)


def greedy_full_forwards(model, ids, steps):
    with torch.inference_mode():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_ar_generate_equals_manual_greedy_loop(tokenizer):
    bb = make_backbone("qwen3", tokenizer, dtype=torch.float64)
    ids, _ = encode(tokenizer, PROMPTS[:1])
    expected = greedy_full_forwards(bb.model, ids, 10)[0, ids.shape[1]:].tolist()
    out = ar_generate(bb.model, ids, max_new_tokens=10)
    assert out.tokens == [expected]
    assert out.nfe == 10 and out.tokens_per_forward == 1.0
    batch_ids, batch_mask = encode(tokenizer, PROMPTS[:3])
    batch = ar_generate(bb.model, batch_ids, attention_mask=batch_mask, max_new_tokens=10)
    assert batch.tokens[0] == expected  # left padding handled by transformers' own generate
    eos = expected[4]
    stopped = ar_generate(bb.model, ids, max_new_tokens=10, eos_token_id=eos)
    assert stopped.tokens == [expected[: expected.index(eos) + 1]]


def test_ar_generate_stop_string_spanning_tokens(tokenizer):
    bb = make_backbone("qwen3", tokenizer, dtype=torch.float64)
    ids, _ = encode(tokenizer, PROMPTS[:1])
    expected = ar_generate(bb.model, ids, max_new_tokens=10).tokens[0]
    stop = tokenizer.decode(expected[5:7])  # ends in token 6, starts in token 5
    out = ar_generate(bb.model, ids, max_new_tokens=10, stop=[stop], tokenizer=tokenizer)
    assert out.tokens == [expected[:5]]  # no part of the stop string is left
    assert out.nfe == 7  # transformers stopped at the token completing it


def test_batched_tokens_equal_transformers_greedy_generate(qwen, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS)
    with torch.inference_mode():
        reference = qwen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                        eos_token_id=[], pad_token_id=0)
    out = ar_generate(qwen.model, ids, attention_mask=mask, max_new_tokens=12)
    assert out.tokens == reference[:, ids.shape[1]:].tolist()
    assert out.nfe == 12 and out.num_generated == [12] * len(PROMPTS) and out.tokens_per_forward == 1.0


def test_no_attention_mask_means_every_token_is_real(qwen, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS[:1])
    assert ar_generate(qwen.model, ids, max_new_tokens=6) == ar_generate(qwen.model, ids, attention_mask=mask,
                                                                          max_new_tokens=6)


def test_eos_ends_its_row_only_and_generation_once_every_row_has_ended(qwen, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS[:2])
    full = ar_generate(qwen.model, ids, attention_mask=mask, max_new_tokens=12).tokens
    eos = next(t for t in full[0][2:] if t not in full[1])  # in row 0 only, not at its start
    out = ar_generate(qwen.model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert out.tokens == [full[0][: full[0].index(eos) + 1], full[1]]  # EOS kept, the rest of its row dropped
    assert out.nfe == 12  # row 1 ran to the limit
    alone = ar_generate(qwen.model, ids[:1, mask[0].bool()], max_new_tokens=12, eos_token_id=eos)
    assert alone.tokens == out.tokens[:1] and alone.nfe == full[0].index(eos) + 1  # a lone row stops at its EOS


def test_any_of_several_eos_ids_stops_the_row(qwen, tokenizer):
    ids, _ = encode(tokenizer, PROMPTS[:1])
    full = ar_generate(qwen.model, ids, max_new_tokens=10).tokens[0]
    out = ar_generate(qwen.model, ids, max_new_tokens=10, eos_token_id=[full[7], full[3]])
    assert out.tokens == [full[: full.index(full[3]) + 1]]


def test_no_eos_id_ignores_the_models_generation_config_eos(qwen, tokenizer):
    ids, _ = encode(tokenizer, PROMPTS[:1])
    full = ar_generate(qwen.model, ids, max_new_tokens=10).tokens[0]
    config = qwen.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = full[3]  # transformers alone would stop there
    try:
        out = ar_generate(qwen.model, ids, max_new_tokens=10, eos_token_id=None)
    finally:
        config.eos_token_id = saved
    assert out.tokens == [full] and out.nfe == 10


@pytest.mark.parametrize("max_new_tokens, match", [
    (0, r"^decode\.max_new_tokens=0: must be a positive integer$"),
    (-3, r"^decode\.max_new_tokens=-3: must be a positive integer$"),
    (2.5, r"^decode\.max_new_tokens=2\.5: must be a positive integer$"),
    (True, r"^decode\.max_new_tokens=True: must be a positive integer$"),
    (248, r"^decode\.max_new_tokens=248: prompt length 9 \+ 248 = 257 exceeds "
          r"model\.config\.max_position_embeddings=256$"),
])
def test_bad_max_new_tokens_is_a_one_line_config_error(qwen, tokenizer, max_new_tokens, match):
    ids, mask = encode(tokenizer, PROMPTS[:2])
    with pytest.raises(ConfigError, match=match) as err:
        ar_generate(qwen.model, ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    assert "\n" not in str(err.value)


def test_stop_strings_without_a_tokenizer_fail_before_any_forward(qwen, tokenizer):
    ids, _ = encode(tokenizer, PROMPTS[:1])
    with pytest.raises(ConfigError, match=r"^stop=\['x'\]: stop strings need the tokenizer \(tokenizer=\.\.\.\)$"):
        ar_generate(qwen.model, ids, max_new_tokens=4, stop=["x"])


# --- the lean AR mode of dlm's engine: the same tokens as transformers generate ----------------------------------


def lean(bb, prompts, **kwargs):
    ids, mask = encode(bb.tokenizer, prompts)
    return generate(bb.model, ids, attention_mask=mask, mode="ar", **kwargs)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_lean_ar_mode_equals_transformers_generate_on_a_left_padded_batch(qwen, cache):
    ids, mask = encode(qwen.tokenizer, PROMPTS)
    hf = ar_generate(qwen.model, ids, attention_mask=mask, max_new_tokens=12)
    ours = lean(qwen, PROMPTS, max_new_tokens=12, cache=cache)
    assert ours.tokens == hf.tokens and ours.nfe == hf.nfe == 12 and ours.tokens_per_forward == 1.0
    assert lean(qwen, PROMPTS, max_new_tokens=12, use_cache=False).tokens == hf.tokens


def test_lean_ar_rows_leave_at_eos_with_the_tokens_generate_gives(qwen):
    ids, mask = encode(qwen.tokenizer, PROMPTS)
    full = ar_generate(qwen.model, ids, attention_mask=mask, max_new_tokens=10)
    eos = full.tokens[1][2]
    hf = ar_generate(qwen.model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    ours = lean(qwen, PROMPTS, max_new_tokens=10, eos_token_id=eos)
    assert ours.tokens == hf.tokens
    assert ours.row_forwards == [len(t) for t in ours.tokens]  # a row takes part until its EOS, no further


def test_lean_ar_stop_strings_cut_like_generate(qwen, tokenizer):
    ids, _ = encode(tokenizer, PROMPTS[:1])
    text = tokenizer.decode(ar_generate(qwen.model, ids, max_new_tokens=16).tokens[0])
    stop = [text[len(text) // 2 : len(text) // 2 + 2]]
    hf = ar_generate(qwen.model, ids, max_new_tokens=16, stop=stop, tokenizer=tokenizer)
    ours = generate(qwen.model, ids, mode="ar", max_new_tokens=16, stop=stop, tokenizer=tokenizer)
    assert ours.tokens == hf.tokens and len(ours.tokens[0]) < 16


def test_lean_ar_never_picks_the_excluded_mask_token(qwen):
    ids, _ = encode(qwen.tokenizer, PROMPTS[:1])
    free = lean(qwen, PROMPTS[:1], max_new_tokens=6).tokens[0]
    banned = lean(qwen, PROMPTS[:1], max_new_tokens=6, mask_token_id=free[0]).tokens[0]
    assert free[0] not in banned[:1] and banned[0] != free[0]
