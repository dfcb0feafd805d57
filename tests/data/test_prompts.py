"""Prompt sets and GSM8K-style exact-match scoring: the synthetic split, plain prompts, '#### N' answers."""

from __future__ import annotations

import pytest

from dlm.data.prompts import Prompt, extract_answer, load_prompts, reference_answer, score
from dlm.settings import ConfigError, DataConfig


def test_score_reads_the_number_after_hashes_up_to_eos(tokenizer):
    eos = tokenizer.eos_token_id
    right = tokenizer.encode("3 + 4 = 7\n#### 7") + [eos] + tokenizer.encode("#### 9")
    wrong = tokenizer.encode("#### 1,000.")
    assert score(tokenizer, [right, wrong], ["7", "1000"]) == 1.0
    assert score(tokenizer, [right, wrong], ["9", "7"]) == 0.0
    assert reference_answer("Tom has 3 + 4 = 7 apples.\n#### 7") == "7" and extract_answer("no answer") is None


def test_synthetic_prompts_are_the_test_split_in_the_training_template(tmp_path):
    prompts = load_prompts("synthetic", limit=2, data=DataConfig(cache_dir=str(tmp_path), synthetic_size=20))
    assert len(prompts) == 2 and all(p.text.startswith("Question: ") and p.text.endswith("\nAnswer:") for p in prompts)
    assert all(p.answer.isdigit() for p in prompts)
    assert load_prompts(["a", "b"], limit=5) == [Prompt("a", None), Prompt("b", None)]


def test_jsonl_rows_read_gsm8k_questions_into_the_training_template(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text('{"question": "Ana has 2 pens.\u2028How many?", "answer": "2 pens.\\n#### 1,002"}\n'
                    '\n{"prompt": "x"}\n', encoding="utf-8")  # a raw U+2028 inside a string is not a line break
    assert load_prompts(path, limit=5) == [Prompt("Question: Ana has 2 pens.\u2028How many?\nAnswer:", "1002"),
                                           Prompt("x", None)]


def test_bad_prompt_files_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^bench.prompts='.*missing.jsonl': no such file; allowed: synthetic, "):
        load_prompts(tmp_path / "missing.jsonl", limit=1)
    (tmp_path / "rows.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ConfigError, match=r"rows need a 'prompt' \(or GSM8K 'question'\) field; got \['text'\]$"):
        load_prompts(tmp_path / "rows.jsonl", limit=1)


def test_few_shot_context_puts_solved_train_rows_before_every_prompt(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
                                          '{"question": "2 + 2?", "answer": "#### 4"}\n'
                                          '{"question": "x", "answer": "y"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "3 + 3?", "answer": "#### 6"}\n')
    shots = "Question: 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: 2 + 2?\nAnswer: #### 4\n\n"
    got = load_prompts(tmp_path / "test.jsonl", limit=1, few_shot=2)
    assert got == [Prompt(shots + "Question: 3 + 3?\nAnswer:", "6")]
    data = DataConfig(cache_dir=str(tmp_path), synthetic_size=20)
    plain = load_prompts("synthetic", limit=1, data=data)
    shot = load_prompts("synthetic", limit=1, data=data, few_shot=1)
    assert shot[0].text.endswith("\n\n" + plain[0].text) and shot[0].text.startswith("Question: ")
    assert shot[0].answer == plain[0].answer


def test_few_shot_without_a_train_split_fails_in_one_line(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "3 + 3?", "answer": "#### 6"}\n')
    with pytest.raises(ConfigError, match=r"^bench.few_shot=2: the shots come from .*train.jsonl, which does not"):
        load_prompts(tmp_path / "test.jsonl", limit=1, few_shot=2)
    (tmp_path / "train.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    with pytest.raises(ConfigError, match=r"^bench.few_shot=2: .*train.jsonl needs 2 rows with 'question' and 'an"):
        load_prompts(tmp_path / "test.jsonl", limit=1, few_shot=2)
    with pytest.raises(ConfigError, match=r"^bench.few_shot=1: needs a prompt file with a train.jsonl beside it"):
        load_prompts(["a"], limit=1, few_shot=1)
