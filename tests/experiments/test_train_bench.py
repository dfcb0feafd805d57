from __future__ import annotations

import pytest

from dlm.experiments.train_bench import TrainSpeed, bench_training, format_rows
from dlm.settings import ConfigError, TrainBenchConfig
from tests.training.test_trainer import SMALL_MODEL


def test_bench_training_measures_each_pattern(tmp_path):
    overrides = [*SMALL_MODEL, "model.name_or_path=null", "model.tokenizer=builtin:tiny", f"data.cache_dir={tmp_path}",
                 "data.synthetic_size=300", "data.max_length=32", "data.batch_size=4", "trainer.accelerator=cpu"]
    rows = bench_training("experiments/tiny.yaml", TrainBenchConfig(["causal", "block_clean"], steps=4),
                          overrides=overrides)
    assert [r.pattern for r in rows] == ["causal", "block_clean"]
    assert all(r.tokens_per_sec > 0 and r.final_loss > 0 for r in rows)
    assert "| block_clean |" in format_rows(rows)


def test_format_rows_relative_to_causal():
    text = format_rows([TrainSpeed("causal", 1000.0, None, 1.0), TrainSpeed("block", 500.0, 0.25, 1.0)])
    assert "| block | 500 | 0.50x | 25.0% |" in text and "n/a (CPU)" in text


def test_unknown_pattern_is_one_line():
    with pytest.raises(ConfigError, match=r"^bench_train.patterns='blok': unknown pattern; allowed: bidirectional"):
        TrainBenchConfig(["blok"])


def test_a_run_too_short_to_measure_fails_loudly(tmp_path):
    overrides = [*SMALL_MODEL, "model.name_or_path=null", "model.tokenizer=builtin:tiny", f"data.cache_dir={tmp_path}",
                 "data.synthetic_size=300", "data.max_length=32", "data.batch_size=4", "trainer.accelerator=cpu"]
    with pytest.raises(ConfigError, match=r"^bench_train.steps: the causal run logged no train/device/items_per_sec"):
        bench_training("experiments/tiny.yaml", TrainBenchConfig(["causal"], steps=1), overrides=overrides)
