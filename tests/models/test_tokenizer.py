"""The offline BPE: special tokens, lossless round trips, a reloadable folder, the asked-for vocabulary size."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dlm.data.synthetic import corpus
from dlm.models.tokenizer import EOS_TOKEN, MASK_TOKEN, tiny_tokenizer, train_tokenizer

TEXTS = corpus(200, seed=7)  # a seed the tokenizer was not trained on (it uses seed 0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


def test_tiny_tokenizer_has_eos_as_pad_and_a_mask_token(tiny):
    assert (tiny.eos_token, tiny.pad_token, tiny.mask_token) == (EOS_TOKEN, EOS_TOKEN, MASK_TOKEN)
    assert tiny.eos_token_id == tiny.pad_token_id != tiny.mask_token_id
    assert tiny.eos_token_id is not None and tiny.mask_token_id is not None
    assert tiny.tokenize(EOS_TOKEN + MASK_TOKEN) == [EOS_TOKEN, MASK_TOKEN]  # each one token, never split


def test_tiny_tokenizer_is_deterministic(tiny):
    assert tiny_tokenizer().get_vocab() == tiny.get_vocab()


def test_synthetic_task_text_round_trips_losslessly(tiny):
    for text in TEXTS:
        ids = tiny(text, add_special_tokens=False)["input_ids"]
        assert tiny.decode(ids) == text
        assert tiny.mask_token_id not in ids and tiny.eos_token_id not in ids


def test_task_text_is_compressed_by_the_merges(tiny):
    """Trained on the task corpus, BPE needs far fewer tokens than bytes for it."""
    text = TEXTS[0]
    assert len(tiny(text)["input_ids"]) < len(text.encode()) / 2


def test_digits_are_one_token_each(tiny):
    assert tiny.tokenize("#### 1234") == ["####", "Ġ", "1", "2", "3", "4"]
    assert tiny.tokenize("Tom has 17 apples.") == ["Tom", "Ġhas", "Ġ", "1", "7", "Ġapples", "."]


def test_any_utf8_text_round_trips_by_byte_fallback(tiny):
    text = "Größe: 東京 costs 12€ 🙂\ttab"
    assert tiny.decode(tiny(text)["input_ids"]) == text


def test_saved_folder_reloads_with_auto_tokenizer_and_the_same_ids(tmp_path):
    saved = tiny_tokenizer(out_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.eos_token, loaded.pad_token, loaded.mask_token) == (EOS_TOKEN, EOS_TOKEN, MASK_TOKEN)
    assert (loaded.eos_token_id, loaded.mask_token_id) == (saved.eos_token_id, saved.mask_token_id)
    assert len(loaded) == len(saved)
    batch = TEXTS[:20] + [EOS_TOKEN + " 17 " + MASK_TOKEN]
    assert loaded(batch)["input_ids"] == saved(batch)["input_ids"]


def test_tiny_tokenizer_has_384_tokens(tiny):
    assert len(tiny) == len(tiny.get_vocab()) == 384


def test_train_tokenizer_has_the_requested_vocab_size():
    tok = train_tokenizer(corpus(300, seed=1), vocab_size=300)
    assert len(tok) == len(tok.get_vocab()) == 300
    assert tok.convert_tokens_to_ids([EOS_TOKEN, MASK_TOKEN]) == [0, 1]  # the special tokens come first


def test_train_tokenizer_vocab_size_is_a_ceiling_on_a_small_corpus():
    """BPE stops when no pair is left to merge: 300 short texts support fewer than 500 tokens."""
    tok = train_tokenizer(corpus(300, seed=1), vocab_size=500)
    assert 300 < len(tok) < 500
