"""Prompt sets for decoding benchmarks and their GSM8K-style exact-match scoring.

A prompt set is the synthetic task's test split, a JSONL file of {"prompt", "answer"} (or GSM8K
{"question", "answer"}) rows, or a list of plain strings (unscored). Answers are compared as
lm-eval's gsm8k strict-match does: the number after '#### ', commas and a trailing period dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from dlm.data.jsonl import read_jsonl
from dlm.data.synthetic import PROMPT_TEMPLATE, format_example, synthetic_dir
from dlm.settings import SYNTHETIC, ConfigError, DataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
"""lm-eval gsm8k strict-match: the number after '#### '."""


class Prompt(NamedTuple):
    text: str
    answer: str | None  # normalised reference number; None = unscored


def load_prompts(source: str | Path | Sequence[str] | None, *, limit: int,
                 data: DataConfig | None = None, few_shot: int = 0,
                 chat: bool = False) -> list[Prompt]:
    """The first `limit` prompts of `synthetic` (the task's test split), a JSONL file of
    {"prompt", "answer"} (or GSM8K {"question", "answer"}) rows, or a list of plain prompts
    (unscored); `few_shot` solved examples before each (:func:`few_shot_context`). With `chat`, a
    GSM8K question stays bare: it becomes the user turn of a chat template, as in chat-format
    training data."""
    prefix = few_shot_context(source, few_shot, data) if few_shot else ""
    if source is None or str(source) == SYNTHETIC:
        rows = read_jsonl(synthetic_dir(data or DataConfig()) / "test.jsonl")
    elif isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ConfigError(f"bench.prompts={str(source)!r}: no such file; "
                              f"allowed: {SYNTHETIC}, a JSONL file of {{prompt, answer}} rows")
        rows = read_jsonl(Path(source))
    else:
        rows = [{"prompt": text} for text in source]
    prompts = [_to_prompt(row, source, chat=chat) for row in rows[:limit]]
    if not prompts:
        raise ConfigError(f"bench.prompts={str(source)!r}: no prompts")
    return [Prompt(prefix + p.text, p.answer) for p in prompts]


def few_shot_context(source: str | Path | Sequence[str] | None, shots: int,
                     data: DataConfig | None = None) -> str:
    """A few-shot context in lm-eval gsm8k's format: `shots` solved train rows, each
    "Question: ...\nAnswer: <solution>" and a blank line. The first rows of the train split beside
    the prompts (lm-eval draws them at random; what a speed benchmark needs is the length, and a
    fixed context keeps runs comparable)."""
    if source is None or str(source) == SYNTHETIC:
        train = synthetic_dir(data or DataConfig()) / "train.jsonl"
    elif isinstance(source, (str, Path)):
        train = Path(source).with_name("train.jsonl")
    else:
        raise ConfigError(f"bench.few_shot={shots}: needs a prompt file with a train.jsonl "
                          "beside it; the prompts are a list of strings")
    if not train.is_file():
        raise ConfigError(f"bench.few_shot={shots}: the shots come from {train}, "
                          "which does not exist")
    rows = read_jsonl(train)[:shots]
    if len(rows) < shots or not all("question" in r and "answer" in r for r in rows):
        raise ConfigError(f"bench.few_shot={shots}: {train} needs {shots} rows "
                          "with 'question' and 'answer'")
    return "".join(format_example(r)["text"] + "\n\n" for r in rows)


def _to_prompt(row: dict, source: Any, *, chat: bool = False) -> Prompt:
    if "prompt" not in row and "question" not in row:
        raise ConfigError(f"bench.prompts={str(source)!r}: rows need a 'prompt' "
                          f"(or GSM8K 'question') field; got {sorted(row)}")
    text = row.get("prompt") or (row["question"] if chat
                                 else PROMPT_TEMPLATE.format(question=row["question"]))
    answer = row.get("answer")
    return Prompt(text, None if answer is None else reference_answer(str(answer)))


def _normalise(number: str) -> str:
    return number.strip().replace(",", "").rstrip(".")


def reference_answer(answer: str) -> str:
    """GSM8K answers end in '#### N'; an answer without that marker is taken whole."""
    match = ANSWER_RE.search(answer)
    return _normalise(match.group(1) if match else answer)


def extract_answer(text: str) -> str | None:
    match = ANSWER_RE.search(text)
    return _normalise(match.group(1)) if match else None


def answers_of(tokenizer: PreTrainedTokenizerBase,
               generated: Sequence[list[int]]) -> list[str | None]:
    """The '#### N' number of each generated row;
    text is cut at the first EOS (matters under `ignore_eos`)."""
    eos = tokenizer.eos_token_id
    return [extract_answer(tokenizer.decode(t[: t.index(eos)] if eos in t else t))
            for t in generated]


def score(tokenizer: PreTrainedTokenizerBase, generated: Sequence[list[int]],
          answers: Sequence[str | None]) -> float:
    """Exact match of the '#### N' number per generated row (:func:`answers_of`)."""
    extracted = answers_of(tokenizer, generated)
    hits = [got == answer for got, answer in zip(extracted, answers, strict=True)]
    return sum(hits) / len(hits)
