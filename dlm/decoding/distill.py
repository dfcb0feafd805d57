"""A teacher's own completions as training rows: sequence-level knowledge distillation (Kim & Rush,
2016) for a conversion.

Converted on the reference answers, a student learns the data's distribution; converted on the
teacher's greedy completions of the same prompts, it learns the teacher's mode (what agreement with
the teacher asks), and the low-entropy targets raise the confidence the threshold decoder commits
on (BENCHMARKS.md §14: higher TPF at half the tokens; agreement still needs a teacher that is mostly
right). Each written row is its source row with
the response field replaced by the teacher's text (the source's value kept under `reference`), so
the same `data.prompt_field` / `data.response_field` read either file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dlm.data.chat import ChatFormat
from dlm.data.jsonl import read_jsonl
from dlm.decoding.text import complete
from dlm.models.backbone import Backbone
from dlm.models.checkpoint import CheckpointMeta
from dlm.settings import ConfigError, DecodeConfig, DistillConfig


@dataclass(frozen=True)
class DistillReport:
    """What one `distill` call wrote: rows, the unfinished completions dropped, tokens, time."""

    out: Path
    written: int
    dropped: int
    tokens: int
    seconds: float

    def line(self) -> str:
        dropped = f" ({self.dropped} unfinished dropped)" if self.dropped else ""
        return (f"wrote {self.written} rows to {self.out}{dropped}; {self.tokens} tokens in "
                f"{self.seconds:.0f} s ({self.tokens / max(self.seconds, 1e-9):.1f} tokens/s)")


def source_rows(settings: DistillConfig) -> list[dict]:
    """The prompt rows, checked in one line each before anything loads: the file exists, the
    output does not, every row has the prompt field."""
    source, out = Path(settings.data), Path(settings.out)
    if not source.is_file():
        raise ConfigError(f"distill.data={settings.data!r}: no such file; "
                          "allowed: a JSONL file of prompt rows")
    if out.exists():
        raise ConfigError(f"distill.out={settings.out!r}: exists; allowed: a new path "
                          "(written rows are never overwritten)")
    rows = read_jsonl(source)[settings.skip:][: settings.limit]
    if not rows:
        raise ConfigError(f"distill.data={settings.data!r}: no rows after distill.skip="
                          f"{settings.skip}; allowed: a JSONL file of more than skip prompt rows")
    missing = [i for i, row in enumerate(rows) if settings.prompt_field not in row]
    if missing:  # numbered as in the file
        raise ConfigError(f"distill.prompt_field={settings.prompt_field!r}: row "
                          f"{settings.skip + missing[0]} has no such field; "
                          f"allowed: one of {sorted(rows[missing[0]])}")
    return rows


def distill(teacher: tuple[Backbone, CheckpointMeta], rows: list[dict], settings: DistillConfig,
            decode: DecodeConfig, *, chat: ChatFormat | None = None) -> DistillReport:
    """Complete every row's prompt with the teacher, `batch_size` at a time, appending the kept
    rows to `settings.out` batch by batch (an interrupted run keeps what it wrote)."""
    backbone, meta = teacher
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    eos = backbone.tokenizer.eos_token_id
    written = dropped = tokens = 0
    start = time.perf_counter()
    with open(out, "x", encoding="utf-8") as fh:
        for first in range(0, len(rows), settings.batch_size):
            batch = rows[first : first + settings.batch_size]
            prompts = [str(row[settings.prompt_field]) for row in batch]
            result = complete(backbone, meta, prompts, decode, chat=chat)
            for row, text, ids in zip(batch, result.texts, result.output.tokens):
                tokens += len(ids)
                if eos not in ids and not settings.keep_unfinished:
                    dropped += 1
                    continue
                kept = {**row, settings.response_field: text}
                if settings.response_field in row:
                    kept["reference"] = row[settings.response_field]
                fh.write(json.dumps(kept) + "\n")
                written += 1
            fh.flush()
    return DistillReport(out, written, dropped, tokens, time.perf_counter() - start)
