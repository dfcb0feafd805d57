"""`dlm.experiments.points`: grid expansion and point ids, each point's experiment config, and the checks of
every point before any run."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlm.experiments.points import expand, point_config, point_id, validate_sweep
from dlm.settings import ConfigError
from dlm.settings.sweep import SweepConfig, load_sweep
from tests.experiments.test_sweep import SWEEP_NAME, write_sweep


def _sweep(tmp_path: Path, ar: Path = Path("/nonexistent"), **kw) -> SweepConfig:
    return load_sweep(write_sweep(tmp_path, ar, **kw))


# -- expansion and ids ------------------------------------------------------------------------------
def test_grid_is_the_cartesian_product_with_the_last_key_fastest(tmp_path):
    sweep = _sweep(tmp_path, grid={"attention.pattern": ["block", "block_clean"], "objective.shift": [False, True]})
    points = expand(sweep)
    assert [p.id for p in points] == ["pattern-block_shift-false", "pattern-block_shift-true",
                                      "pattern-block_clean_shift-false", "pattern-block_clean_shift-true"]
    assert points[1].values == {"attention.pattern": "block", "objective.shift": True}
    assert points[1].overrides == ['attention.pattern="block"', "objective.shift=true"]


def test_explicit_points_follow_the_grid_with_their_own_keys_and_optional_id(tmp_path):
    sweep = _sweep(tmp_path, grid={"masking.half_life": [0.1, 1.0]},
                   points=[{"masking.strategy": "uniform"}, {"id": "lambda-small", "masking.half_life": 0.03}])
    points = expand(sweep)
    assert [p.id for p in points] == ["half_life-0.1", "half_life-1", "strategy-uniform", "lambda-small"]
    assert points[3].values == {"masking.half_life": 0.03} and points[3].index == 3


def test_point_id_is_a_readable_stable_slug():
    assert point_id({"attention.pattern": "block_clean", "objective.shift": True}) == "pattern-block_clean_shift-true"
    assert point_id({"optim.lr": 1e-05, "attention.block_size": 16}) == "lr-1e-05_block_size-16"
    # two swept keys ending alike keep their full names
    assert point_id({"masking.eps": 0.01, "objective.eps": 0.5}) == "masking-eps-0.01_objective-eps-0.5"


def test_point_values_keep_their_types_in_the_experiment_config(tmp_path):
    sweep = _sweep(tmp_path, grid={"masking.half_life": [0.5]}, points=[{"model.mask_token": "0.1"}])
    half, token = expand(sweep)
    assert point_config(sweep, half).masking.half_life == 0.5
    assert point_config(sweep, token).model.mask_token == "0.1"  # a string stays a string


def test_point_config_sets_output_resume_name_and_child_tags(tmp_path):
    sweep = _sweep(tmp_path)
    cfg = point_config(sweep, expand(sweep)[1], parent_run_id="abc")
    assert cfg.output_dir == str(tmp_path / "out" / SWEEP_NAME / "pattern-block_clean")
    assert cfg.resume is True and cfg.name == f"{SWEEP_NAME}-pattern-block_clean"
    assert cfg.tracking.tags == {"dlm.sweep": SWEEP_NAME, "dlm.point": "pattern-block_clean", "dlm.point_index": "1",
                                 "dlm.role": "child", "dlm.status": "running", "mlflow.parentRunId": "abc"}
    assert (cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name) == (
        f"sqlite:///{tmp_path / 'mlflow.db'}", "sweeps", "pattern-block_clean")


def test_two_points_with_one_id_fail_in_one_line(tmp_path):
    sweep = _sweep(tmp_path, grid={}, points=[{"id": "x", "optim.lr": 1.0}, {"id": "x", "optim.lr": 2.0}])
    with pytest.raises(ConfigError, match=r"^points='x': two points have this id \(#0 and #1\)"):
        expand(sweep)


# -- validation before anything runs ----------------------------------------------------------------
def test_a_missing_base_checkpoint_says_to_train_the_tiny_ar_model_first(tmp_path):
    with pytest.raises(ConfigError, match=r"^sweep point 'pattern-block': model.name_or_path='.*/no_ar': no such "
                                          r"folder or .gguf file; train the AR model first \(for the tiny sweeps: "
                                          r"dlm train experiments/tiny_ar.yaml\)$"):
        validate_sweep(load_sweep(write_sweep(tmp_path, tmp_path / "no_ar")))


def test_a_gguf_base_model_passes_validation(tmp_path):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")  # validation only looks for the file; reading it is the training's
    validate_sweep(load_sweep(write_sweep(tmp_path, gguf)))


def test_a_missing_data_file_fails_validation(tmp_path, ar_checkpoint):
    path = write_sweep(tmp_path, ar_checkpoint, points=[{"data.path": "./nowhere.jsonl"}])
    with pytest.raises(ConfigError, match=r"^sweep point 'path-._nowhere.jsonl': data.path='./nowhere.jsonl': no such"):
        validate_sweep(load_sweep(path))
