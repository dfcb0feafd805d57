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
