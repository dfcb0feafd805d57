"""A synthetic GSM8K-format task that a tiny model learns on 2 CPU cores in minutes.

Rows look like GSM8K (`{"question": str, "answer": "... #### N"}`), so the DataModule, the decoder
and lm-eval's GSM8K scoring (strict `#### N` match) all run unchanged on it. Generation is
deterministic in the seed. Why one-step add/subtract with numbers 1-20: docs/design.md §3 (a
sub-million-parameter model learns it in CPU minutes; BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from dlm.data.jsonl import write_jsonl
from dlm.settings import ConfigError, DataConfig

NAMES = ["Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Ben", "Eva", "Max", "Ivy", "Jon", "Kim"]
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "cups", "eggs", "rocks"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"]
LOSSES = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]
FREE_TEXT = [
    "{name} keeps the {obj} in a box by the window.",
    "Every morning {name} counts the {obj} before school.",
    "The {obj} that {name} likes best are the small ones.",
    "{name} and a friend sort the {obj} into two rows.",
]

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
"""The stock lm-eval gsm8k prompt; training text is the prompt + ' ' + answer."""


def make_problem(rng: random.Random, max_number: int = 20) -> dict[str, str]:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(1, max_number), rng.randint(1, max_number)
    if rng.random() < 0.5:
        verb, result, sign = rng.choice(GAINS).format(n=b), a + b, "+"
    else:
        a, b = max(a, b), min(a, b)
        verb, result, sign = rng.choice(LOSSES).format(n=b), a - b, "-"
    question = f"{name} has {a} {obj}. {name} {verb}. How many {obj} does {name} have now?"
    answer = f"{name} has {a} {sign} {b} = {result} {obj}.\n#### {result}"
    return {"question": question, "answer": answer}


def make_free_text(rng: random.Random) -> str:
    return rng.choice(FREE_TEXT).format(name=rng.choice(NAMES), obj=rng.choice(OBJECTS))


def problems(n: int, *, seed: int = 0, max_number: int = 20) -> Iterator[dict[str, str]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield make_problem(rng, max_number)


def format_example(row: dict[str, str]) -> dict[str, str]:
    """Prompt/response split of a GSM8K-format row, plus the joined training text."""
    prompt = PROMPT_TEMPLATE.format(question=row["question"])
    response = " " + row["answer"]
    return {"prompt": prompt, "response": response, "text": prompt + response}


def corpus(n: int = 2000, *, seed: int = 0, max_number: int = 20) -> list[str]:
    """Training texts: formatted problems with some free text mixed in (tokenizer + LM corpus)."""
    rng = random.Random(seed + 1)
    texts = [format_example(p)["text"] for p in problems(n, seed=seed, max_number=max_number)]
    texts += [make_free_text(rng) for _ in range(max(1, n // 10))]
    return texts


def write_splits(
    out_dir: str | Path, *, train_size: int = 20000, test_size: int = 200, seed: int = 0,
    max_number: int = 20
) -> Path:
    """Write `train.jsonl` / `test.jsonl` with `question`, `answer`, `prompt`, `response`, `text`.

    Test problems are drawn from a disjoint seed and any that also occur in train are dropped, so
    the score measures generalisation. Free-text rows (empty question) are mixed into train only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [p | format_example(p) for p in problems(train_size, seed=seed, max_number=max_number)]
    rng = random.Random(seed + 1)
    free = [{"question": "", "answer": "", "prompt": "", "response": t, "text": t}
            for t in (make_free_text(rng) for _ in range(train_size // 10))]
    seen = {p["question"] for p in train}
    test = held_out_problems(seen, test_size, seed=seed + 10_000, max_number=max_number)
    write_jsonl(out / "train.jsonl", train + free)
    write_jsonl(out / "test.jsonl", test)
    return out


def held_out_problems(seen: set[str], n: int, *, seed: int,
                      max_number: int) -> list[dict[str, str]]:
    """`n` problems none of which is in `seen`; fails in one line when the problem space is too
    small for that (with a tiny `max_number`, nearly every problem already occurs in train)."""
    test: list[dict[str, str]] = []
    for p in problems(n * 200, seed=seed, max_number=max_number):
        if p["question"] not in seen:
            test.append(p | format_example(p))
            if len(test) == n:
                return test
    raise ConfigError(f"data.synthetic_max_number={max_number}: too few distinct problems "
                      f"for {n} test problems unseen in {len(seen)} training ones; "
                      "use a larger max_number or a smaller synthetic_size")


def synthetic_dir(cfg: DataConfig, seed: int = 0) -> Path:
    """Folder of the generated task (train/test jsonl),
    written once and reused by every later command."""
    name = f"synthetic-n{cfg.synthetic_size}-max{cfg.synthetic_max_number}-s{seed}"
    root = Path(cfg.cache_dir) / name
    if not (root / "test.jsonl").is_file():
        write_splits(root, train_size=cfg.synthetic_size, seed=seed,
                     max_number=cfg.synthetic_max_number)
    return root
