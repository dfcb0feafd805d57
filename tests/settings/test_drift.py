"""`dlm.settings.drift`: `dlm drift` settings; the reference AR model is required and the step is >= 0."""

from __future__ import annotations

import pytest

from dlm.cli.dataclass_args import dataclass_from_args
from dlm.cli.main import build_parser
from dlm.settings import ConfigError, DriftConfig
from dlm.settings.loading import merge


def test_defaults_given_a_reference():
    cfg = DriftConfig(reference="models/ar")
    assert (cfg.reference, cfg.plot, cfg.step) == ("models/ar", None, 0)


def test_reference_is_required():
    with pytest.raises(TypeError, match="reference"):
        DriftConfig()


def test_reference_is_a_required_flag_of_dlm_drift(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["drift", "ckpt"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --reference" in capsys.readouterr().err


@pytest.mark.parametrize("step", [0, 1, 10_000])
def test_non_negative_steps_are_accepted(step):
    assert DriftConfig(reference="r", step=step).step == step


@pytest.mark.parametrize("step", [-1, -100])
def test_negative_step_fails_in_one_line(step):
    with pytest.raises(ConfigError, match=rf"^drift\.step={step}: must be >= 0$"):
        DriftConfig(reference="r", step=step)


def test_cli_flags_build_the_settings():
    args = build_parser().parse_args(["drift", "a", "b", "--reference", "ar", "--plot", "d.png", "--step", "5"])
    assert args.checkpoints == ["a", "b"]
    assert dataclass_from_args(args, DriftConfig) == DriftConfig(reference="ar", plot="d.png", step=5)
    args = build_parser().parse_args(["drift", "a", "--reference", "ar"])
    assert dataclass_from_args(args, DriftConfig) == DriftConfig(reference="ar")


def test_merged_from_overrides_the_same_check_runs():
    assert merge(DriftConfig, [], ["reference=ar", "step=3"]) == DriftConfig(reference="ar", step=3)
    with pytest.raises(ConfigError, match=r"^drift\.step=-2: must be >= 0$"):
        merge(DriftConfig, [], ["reference=ar", "step=-2"])
