"""`dlm.evaluation.datasets`: the offline loaders lm-eval calls through `!function` in evals/."""

from __future__ import annotations

import json

from dlm.data.synthetic import synthetic_dir
from dlm.evaluation.datasets import gsm8k_synthetic_dataset
from dlm.settings import DataConfig
from tests.evaluation.test_evaluate import synthetic_metadata


def test_synthetic_dataset_is_the_held_out_split_without_free_text(tmp_path):
    meta = synthetic_metadata(tmp_path)
    dataset = gsm8k_synthetic_dataset(**meta)
    held_out = [json.loads(line) for line in (synthetic_dir(DataConfig(synthetic_size=400, cache_dir=meta["cache_dir"]))
                                              / "test.jsonl").read_text().splitlines()]
    assert dataset["test"]["question"] == [r["question"] for r in held_out]
    assert all(dataset["train"]["question"])  # no free-text rows among few-shot candidates
