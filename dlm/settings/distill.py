"""Settings of `dlm distill`: which prompts the teacher answers, where the rows go, which it
keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dlm.settings.errors import check, check_positive_int


@dataclass
class DistillConfig:
    data: str
    """JSONL file of prompt rows (e.g. GSM8K train: {"question", "answer"})."""
    out: str
    """JSONL file to write; must not exist (nothing already written is overwritten)."""
    prompt_field: str = "question"
    """The rows' prompt column (the user turn under a chat template)."""
    response_field: str = "answer"
    """The column the teacher's completion is written to; the source's value moves to
    `reference`."""
    skip: int = 0
    """Rows to pass over first: a second pass continues where one with `limit` stopped (its
    rows were answered already), writing to a new `out`."""
    limit: Optional[int] = None
    """Answer at most `limit` rows after the skipped ones (default: all)."""
    batch_size: int = 64
    """Prompts decoded together (rows that finish leave the batch early)."""
    keep_unfinished: bool = False
    """Keep completions that reach `max_new_tokens` without an end token (default: drop them; a
    response cut mid-sentence would teach the student to end there)."""

    def __post_init__(self) -> None:
        check(isinstance(self.skip, int) and self.skip >= 0, "distill.skip", self.skip,
              "must be a non-negative integer")
        check_positive_int("distill.limit", self.limit, optional=True)
        check_positive_int("distill.batch_size", self.batch_size)
        check(self.prompt_field != self.response_field, "distill.response_field",
              self.response_field, f"must differ from distill.prompt_field={self.prompt_field!r}")
