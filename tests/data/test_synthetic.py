"""The synthetic GSM8K-format task: deterministic rows, right answers, bounded numbers, disjoint splits."""

from __future__ import annotations

import json
import re

import pytest

from dlm.data import synthetic
from dlm.data.synthetic import corpus, format_example, problems, synthetic_dir, write_splits
from dlm.settings import ConfigError, DataConfig

QUESTION = re.compile(
    r"(?P<name>\w+) has (?P<a>\d+) (?P<obj>\w+)\. (?P=name) (?P<verb>.+?) (?P<b>\d+)(?P<more> more)?\. "
    r"How many (?P=obj) does (?P=name) have now\?"
)
GAIN_VERBS = {g.split(" {n}")[0] for g in synthetic.GAINS}
LOSS_VERBS = {v.split(" {n}")[0] for v in synthetic.LOSSES}


def solve(question: str) -> tuple[int, int, int]:
    """(a, b, result) of a generated question, computed from its wording alone."""
    m = QUESTION.fullmatch(question)
    assert m, question
    a, b, verb = int(m["a"]), int(m["b"]), m["verb"]
    if verb in GAIN_VERBS:
        assert m["more"]
        return a, b, a + b
    assert verb in LOSS_VERBS and not m["more"], question
    return a, b, a - b


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_problems_are_deterministic_per_seed():
    assert list(problems(50, seed=3)) == list(problems(50, seed=3))
    assert list(problems(50, seed=3)) != list(problems(50, seed=4))
    assert list(problems(10, seed=3)) == list(problems(50, seed=3))[:10]  # a prefix: n does not reseed


@pytest.mark.parametrize("max_number", [1, 5, 20])
def test_answer_is_the_arithmetic_of_the_question(max_number):
    for row in problems(300, seed=1, max_number=max_number):
        a, b, result = solve(row["question"])
        assert row["answer"].endswith(f"\n#### {result}")
        assert f" {a} {'+' if result == a + b else '-'} {b} = {result} " in row["answer"]
        assert result >= 0  # losses never go below zero


@pytest.mark.parametrize("max_number", [3, 20])
def test_operands_stay_within_1_and_max_number_and_cover_the_range(max_number):
    operands = set()
    for row in problems(2000, seed=0, max_number=max_number):
        a, b, _ = solve(row["question"])
        operands |= {a, b}
    assert operands == set(range(1, max_number + 1))


def test_both_operations_occur():
    results = [solve(row["question"]) for row in problems(200, seed=0)]
    assert any(r == a + b for a, b, r in results) and any(r == a - b for a, b, r in results)


def test_format_example_is_the_gsm8k_prompt_plus_a_spaced_answer():
    row = next(problems(1, seed=0))
    ex = format_example(row)
    assert ex["prompt"] == f"Question: {row['question']}\nAnswer:"
    assert ex["response"] == " " + row["answer"]
    assert ex["text"] == ex["prompt"] + ex["response"]


def test_corpus_is_problems_then_a_tenth_of_free_text():
    texts = corpus(100, seed=2, max_number=7)
    assert texts == corpus(100, seed=2, max_number=7)
    assert len(texts) == 110
    assert texts[:100] == [format_example(p)["text"] for p in problems(100, seed=2, max_number=7)]
    assert all(t.startswith("Question: ") for t in texts[:100])
    assert not any("Question:" in t or "####" in t for t in texts[100:])
    assert len(corpus(3)) == 4  # at least one free-text line


def test_write_splits_writes_train_and_test_jsonl_with_every_field(tmp_path):
    out = write_splits(tmp_path / "nested/task", train_size=200, test_size=20, seed=5)
    assert out == tmp_path / "nested/task"
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temp file left behind
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert len(train) == 200 + 20 and len(test) == 20
    for row in train + test:
        assert set(row) == {"question", "answer", "prompt", "response", "text"}
        assert row["text"] == row["prompt"] + row["response"]
    problems_rows = [r for r in train if r["question"]]
    assert [r["question"] for r in problems_rows] == [p["question"] for p in problems(200, seed=5)]
    assert all(r["question"] for r in test)  # free text goes into train only
    free = [r for r in train if not r["question"]]
    assert len(free) == 20 and all(r["prompt"] == "" and r["response"] == r["text"] for r in free)


def test_write_splits_is_deterministic(tmp_path):
    a = write_splits(tmp_path / "a", train_size=100, test_size=10, seed=1)
    b = write_splits(tmp_path / "b", train_size=100, test_size=10, seed=1)
    for name in ("train.jsonl", "test.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_test_questions_never_occur_in_train_even_in_a_small_question_space(tmp_path):
    """max_number=2 leaves ~3k distinct questions: 1500 train rows collide with many test draws."""
    out = write_splits(tmp_path, train_size=1500, test_size=100, seed=0, max_number=2)
    train = {r["question"] for r in read_jsonl(out / "train.jsonl") if r["question"]}
    test = [r["question"] for r in read_jsonl(out / "test.jsonl")]
    unfiltered = [p["question"] for p in problems(100, seed=10_000, max_number=2)]
    assert any(q in train for q in unfiltered)  # unfiltered, the first 100 test draws would overlap train
    assert test and not set(test) & train
    assert len(test) == 100
    for q in test:
        a, b, _ = solve(q)
        assert 1 <= a <= 2 and 1 <= b <= 2


def test_write_splits_overwrites_earlier_files(tmp_path):
    write_splits(tmp_path, train_size=50, test_size=5, seed=0)
    write_splits(tmp_path, train_size=30, test_size=3, seed=0)
    assert len(read_jsonl(tmp_path / "train.jsonl")) == 33 and len(read_jsonl(tmp_path / "test.jsonl")) == 3


def test_synthetic_dir_writes_the_task_once_and_reuses_it(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), synthetic_size=60, synthetic_max_number=9)
    root = synthetic_dir(cfg, seed=3)
    assert root == tmp_path / "synthetic-n60-max9-s3"
    assert len(read_jsonl(root / "train.jsonl")) == 66
    (root / "train.jsonl").write_text("kept\n")  # a later command must not regenerate the files
    assert synthetic_dir(cfg, seed=3) == root and (root / "train.jsonl").read_text() == "kept\n"
    assert synthetic_dir(cfg, seed=4) != root  # another seed, size or max_number: another folder


def test_a_tiny_max_number_still_gets_a_full_disjoint_test_set(tmp_path):
    write_splits(tmp_path, train_size=2000, test_size=50, max_number=2)
    train = {r["question"] for r in map(json.loads, (tmp_path / "train.jsonl").read_text().splitlines())}
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(test) == 50 and not {r["question"] for r in test} & train


def test_a_problem_space_too_small_for_a_disjoint_test_set_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"data.synthetic_max_number=1: too few distinct problems for 200 test"):
        write_splits(tmp_path, train_size=20000, max_number=1)
