from __future__ import annotations

import pytest

from dlm.settings import ConfigError, DistillConfig


@pytest.mark.parametrize("kwargs, message", [
    ({"skip": -1}, "distill.skip=-1: must be a non-negative integer"),
    ({"limit": 0}, "distill.limit=0: must be a positive integer"),
    ({"batch_size": 0}, "distill.batch_size=0: must be a positive integer"),
    ({"response_field": "question"}, "distill.response_field='question': must differ from distill.prompt_field"),
])
def test_bad_settings_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig("train.jsonl", "out.jsonl", **kwargs)


def test_defaults_read_gsm8k_rows():
    cfg = DistillConfig("train.jsonl", "out.jsonl")
    assert (cfg.prompt_field, cfg.response_field, cfg.skip, cfg.limit, cfg.keep_unfinished) == (
        "question", "answer", 0, None, False)
