"""Offline datasets, called by lm-eval through
`custom_dataset: !function dlm.evaluation.datasets.<loader>` in `evals/`: GSM8K and MMLU from the
data folder, and the synthetic task's splits."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlm.data.jsonl import read_jsonl
from dlm.data.synthetic import synthetic_dir
from dlm.evaluation.tasks import DATA_ENV, find_data_dir
from dlm.settings import ConfigError, DataConfig

if TYPE_CHECKING:
    from datasets import DatasetDict

def gsm8k_local_dataset(data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """openai/gsm8k (main) from <data_dir>/gsm8k/{train,test}.jsonl. Other metadata keys are
    ignored: lm-eval passes the task metadata (model_args included) to every loader."""
    root = _require_data(data_dir, "gsm8k/test.jsonl")
    return _dataset_dict({split: _read_jsonl(root / "gsm8k" / f"{split}.jsonl")
                          for split in ("train", "test")})


def mmlu_local_dataset(subject: str, data_dir: str | Path | None = None,
                       **_: Any) -> DatasetDict:
    """One cais/mmlu subject (`test`, and `dev` for few-shot) from
    <data_dir>/mmlu/{test,dev}.jsonl."""
    root = _require_data(data_dir, "mmlu/test.jsonl")
    splits = {s: [r for r in _read_jsonl(root / "mmlu" / f"{s}.jsonl") if r["subject"] == subject]
              for s in ("test", "dev")}
    if not splits["test"]:
        raise ConfigError(f"dataset_kwargs.subject={subject!r}: no such MMLU subject in "
                          f"{root / 'mmlu/test.jsonl'}")
    return _dataset_dict(splits)


def gsm8k_synthetic_dataset(synthetic_size: int = 20000, synthetic_max_number: int = 20,
                            cache_dir: str | None = None, **_: Any) -> DatasetDict:
    """The synthetic task's splits as written by `dlm.data.synthetic.synthetic_dir`
    (defaults: the tiny experiments')."""
    cfg = DataConfig(synthetic_size=int(synthetic_size),
                     synthetic_max_number=int(synthetic_max_number),
                     cache_dir=str(cache_dir or DataConfig().cache_dir))
    root = synthetic_dir(cfg)
    # train's free-text rows have no question
    splits = {s: [{"question": r["question"], "answer": r["answer"]}
                  for r in _read_jsonl(root / f"{s}.jsonl") if r["question"]]
              for s in ("train", "test")}
    return _dataset_dict(splits)


def _require_data(data_dir: str | Path | None, needed: str) -> Path:
    root = find_data_dir(data_dir)
    if root is None or not (root / needed).is_file():
        raise ConfigError(f"data_dir={str(root) if root else None!r}: no {needed}; "
                          f"allowed: a folder like ../shared/data via ${DATA_ENV}, "
                          f"dlm eval --data-dir, or lm-eval --metadata '{{\"data_dir\": ...}}'")
    return root


@functools.lru_cache(maxsize=8)
def _read_jsonl_cached(path: str, mtime_ns: int) -> tuple[dict, ...]:
    return tuple(read_jsonl(Path(path)))


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file, parsed once per process (57 MMLU subjects read the same file)."""
    return list(_read_jsonl_cached(str(path), path.stat().st_mtime_ns))


def _dataset_dict(splits: dict[str, list[dict]]) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})
