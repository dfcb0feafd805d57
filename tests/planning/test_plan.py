from pathlib import Path

import pytest

from dlm.cli.main import main
from dlm.planning.plan import plan, plan_report
from dlm.settings import ConfigError, load_config
from dlm.settings.scaling import PlanConfig

EXP = Path("experiments")


def _plan(*overrides, **settings):
    return plan(load_config("experiments/qwen3-8b.yaml", overrides=list(overrides)), PlanConfig(**settings),
                config_dir=EXP)


def test_full_shard_divides_state_by_the_gpus():
    one, eight = _plan("trainer.devices=1"), _plan("trainer.devices=8")
    assert eight.memory["optimizer (AdamW)"] == pytest.approx(one.memory["optimizer (AdamW)"] / 8)
    assert eight.memory["parameters"] == pytest.approx(one.params * 2 / 8)  # bf16-true: 2 bytes
    assert eight.tokens_per_s == pytest.approx(8 * one.tokens_per_s)


def test_checkpointing_keeps_only_layer_inputs():
    p = _plan("trainer.devices=8", "trainer.activation_checkpointing=true")
    assert p.activations_checkpointed < p.activations_plain / 4
    assert p.memory["activations (1 micro-batch)"] == p.activations_checkpointed


def test_eight_b_preset_needs_checkpointing_on_eight_h100s(capsys):
    assert main(["plan", "experiments/qwen3-8b.yaml", "trainer.devices=8"]) == 0
    out = capsys.readouterr().out
    assert "does not fit: try trainer.activation_checkpointing=true" in out
    assert "per GPU (h100-80gb" in out and "FLOPs per token" in out
    assert "fits" == plan_report(load_config("experiments/qwen3-8b.yaml", overrides=[
        "trainer.devices=8", "trainer.activation_checkpointing=true"]), PlanConfig(), config_dir=EXP).splitlines()[-1]


def test_unknown_gpu_and_strategy_are_one_line(capsys):
    assert main(["plan", "experiments/qwen3-8b.yaml", "--gpu", "h1000"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ConfigError, match="trainer.strategy='deepspeed'"):
        _plan("trainer.devices=2", "trainer.strategy=deepspeed")
