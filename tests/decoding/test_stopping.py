"""`Stopper` (which rows are done, how their tokens are cut) and `check_inputs` (one-line errors before any
forward), on hand-built token ids of the offline tokenizer."""

from __future__ import annotations

import pytest
import torch

from dlm.decoding.stopping import Stopper, check_inputs
from dlm.settings import ConfigError
from tests.conftest import make_backbone

TEXT = "hello world. The end."
"""Tokenizes to he|ll|o| |w|or|l|d|.| |T|he| |en|d|. (16 tokens)."""


@pytest.fixture(scope="module")
def ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(TEXT)
    assert len(ids) == 16 and tokenizer.decode(ids) == TEXT
    return ids


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_backbone("qwen3", tokenizer).model  # max_position_embeddings=256


def stopper(eos=None, stop=None, tokenizer=None) -> Stopper:
    return Stopper(eos, stop, tokenizer, "cpu")


# --- update ---------------------------------------------------------------------------------------------------


def test_eos_anywhere_in_a_row_finishes_that_row_only():
    generated = torch.tensor([[4, 5, 6, 7], [4, 9, 5, 6], [8, 8, 8, 8]])
    finished = stopper(eos=9).update(torch.tensor([False, False, False]), generated)
    assert finished.tolist() == [False, True, False]


def test_any_of_several_eos_ids_finishes_a_row():
    generated = torch.tensor([[4, 5, 6, 7], [4, 9, 5, 6], [8, 8, 3, 8]])
    assert stopper(eos=[9, 3]).update(torch.zeros(3, dtype=torch.bool), generated).tolist() == [False, True, True]


def test_finished_rows_stay_finished():
    generated = torch.tensor([[4, 5], [6, 7]])
    assert stopper(eos=9).update(torch.tensor([True, False]), generated).tolist() == [True, False]


def test_no_eos_and_no_stop_strings_never_finish_a_row():
    generated = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert stopper().update(torch.zeros(2, dtype=torch.bool), generated).tolist() == [False, False]


def test_stop_string_in_the_decoded_text_finishes_its_row(tokenizer, ids):
    generated = torch.tensor([ids[:8], ids[8:]])  # "hello world" | ". The end."
    finished = stopper(stop=["The"], tokenizer=tokenizer).update(torch.zeros(2, dtype=torch.bool), generated)
    assert finished.tolist() == [False, True]
    finished = stopper(stop=["o w"], tokenizer=tokenizer).update(torch.zeros(2, dtype=torch.bool), generated)
    assert finished.tolist() == [True, False]  # a stop string spanning tokens is found too


# --- truncate ---------------------------------------------------------------------------------------------------


def test_truncate_keeps_the_first_eos_and_drops_the_rest():
    assert stopper(eos=9).truncate([4, 5, 9, 6, 9, 7]) == [4, 5, 9]
    assert stopper(eos=[7, 9]).truncate([4, 5, 9, 6, 7]) == [4, 5, 9]
    assert stopper(eos=9).truncate([9, 4]) == [9]


def test_truncate_without_eos_or_stop_keeps_every_token():
    assert stopper(eos=9).truncate([4, 5, 6]) == [4, 5, 6]
    assert stopper().truncate([4, 9, 6]) == [4, 9, 6]
    assert stopper(eos=9).truncate([]) == []


def test_stop_string_is_cut_together_with_the_token_it_starts_in(tokenizer, ids):
    cut = lambda stop: tokenizer.decode(stopper(stop=[stop], tokenizer=tokenizer).truncate(ids))  # noqa: E731
    assert cut("world.") == "hello "  # starts on a token boundary
    assert cut("orl") == "hello w"  # starts inside the token "or": no part of it is left
    assert cut("lo wor") == "he"  # starts inside "ll" and spans four tokens
    assert cut("hello") == ""  # at the very start: nothing is left
    assert cut("nowhere") == TEXT


def test_the_earliest_of_several_stop_strings_cuts(tokenizer, ids):
    out = stopper(stop=["end", " w", "The"], tokenizer=tokenizer).truncate(ids)
    assert tokenizer.decode(out) == "hello"


def test_eos_cuts_before_stop_strings_are_looked_for(tokenizer, ids):
    eos = ids[8]  # "."
    assert tokenizer.decode(stopper(eos=eos, stop=["The"], tokenizer=tokenizer).truncate(ids)) == "hello world."
    assert tokenizer.decode(stopper(eos=eos, stop=["or"], tokenizer=tokenizer).truncate(ids)) == "hello w"


# --- output -----------------------------------------------------------------------------------------------------


def test_output_truncates_every_row_and_counts_what_is_left(tokenizer, ids):
    generated = torch.tensor([ids[:8], ids[8:]])  # "hello world" | ". The end."
    eos = ids[4]  # "w"
    out = stopper(eos=eos, stop=["en"], tokenizer=tokenizer).output(generated, nfe=5)
    assert out.tokens == [ids[:5], ids[8:13]]
    assert tokenizer.batch_decode(out.tokens) == ["hello w", ". The "]
    assert out.num_generated == [5, 5] and out.nfe == 5 and out.tokens_per_forward == 1.0


# --- check_inputs -----------------------------------------------------------------------------------------------


def left_padded():
    """Two prompts of 3 and 2 real tokens."""
    return torch.tensor([[4, 5, 6], [0, 7, 8]]), torch.tensor([[1, 1, 1], [0, 1, 1]])


def test_left_padded_inputs_within_the_context_pass(model):
    ids, mask = left_padded()
    assert check_inputs(model, ids, mask, 253, None, None) is None  # 3 + 253 = 256: exactly the context


@pytest.mark.parametrize("ids, mask, match", [
    (torch.tensor([4, 5, 6]), torch.tensor([1, 1, 1]),
     r"^input_ids\(3,\): must be \(batch, prompt_length\) with an attention_mask of the same shape$"),
    (torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1]]),
     r"^input_ids\(1, 3\): must be \(batch, prompt_length\) with an attention_mask of the same shape$"),
    (torch.tensor([[4, 5, 6], [7, 8, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
     r"^attention_mask: prompts must be left-padded \(pads first\) with at least one real token per row$"),
    (torch.tensor([[4, 5, 6], [0, 7, 0]]), torch.tensor([[1, 1, 1], [0, 1, 0]]), r"^attention_mask: .*left-padded"),
    (torch.tensor([[4, 5, 6], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]]),
     r"^attention_mask: .*at least one real token per row$"),
])
def test_misshapen_or_right_padded_inputs_fail_in_one_line(model, ids, mask, match):
    with pytest.raises(ConfigError, match=match) as err:
        check_inputs(model, ids, mask, 4, None, None)
    assert "\n" not in str(err.value)


def test_prompt_plus_new_tokens_past_the_context_fails_in_one_line(model):
    ids, mask = left_padded()
    match = (r"^decode\.max_new_tokens=254: prompt length 3 \+ 254 = 257 exceeds "
             r"model\.config\.max_position_embeddings=256$")
    with pytest.raises(ConfigError, match=match):
        check_inputs(model, ids, mask, 254, None, None)


def test_prompt_length_counts_real_tokens_not_padding(model):
    ids, mask = left_padded()
    ids, mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), ids], 1), torch.cat([torch.zeros(2, 5).long(), mask], 1)
    assert check_inputs(model, ids, mask, 253, None, None) is None  # 8 columns, but 3 real tokens at most


def test_stop_strings_need_the_tokenizer(model, tokenizer):
    ids, mask = left_padded()
    match = r"^stop=\['\\n\\n', 'Q:'\]: stop strings need the tokenizer \(tokenizer=\.\.\.\)$"
    with pytest.raises(ConfigError, match=match):
        check_inputs(model, ids, mask, 4, ["\n\n", "Q:"], None)
    assert check_inputs(model, ids, mask, 4, ["\n\n", "Q:"], tokenizer) is None
