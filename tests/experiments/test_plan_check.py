from pathlib import Path

from dlm.experiments.plan_check import check_plan, format_check
from dlm.settings import load_config


def test_plan_is_within_25_percent_of_a_measured_cpu_step(tmp_path):
    """The tiny default's real training steps (the 114M shape is in BENCHMARKS.md: too slow for the suite)."""
    cfg = load_config("experiments/tiny.yaml", overrides=["data.synthetic_size=200", f"data.cache_dir={tmp_path}",
                                                          "data.batch_size=8"])
    check = check_plan(cfg, config_dir=Path("experiments"))
    assert abs(check.error) <= 0.25, format_check(check)
    assert "measured peak" in format_check(check)
