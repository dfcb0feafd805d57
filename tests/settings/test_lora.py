"""`model.lora` settings: the rules checked at load, each failing in one line."""

from __future__ import annotations

import pytest

from dlm.settings import ConfigError, load_config

ON = ["model.lora.enabled=true"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.lora.rank=0"], r"^model.lora.rank=0: must be a positive integer"),
        (["model.lora.alpha=-1"], r"^model.lora.alpha=-1.0: must be > 0"),
        (["model.lora.dropout=1"], r"^model.lora.dropout=1.0: must be in \[0, 1\)"),
        (["model.lora.target_modules=[]"], r"^model.lora.target_modules=\[\]: name at least one module"),
        (["model.lora.export=delta"], r"^model.lora.export='delta': unknown export; allowed: merged, adapter"),
        (["model.lora.export=adapter", "model.name_or_path=null", "model.arch=qwen3", "model.tokenizer=builtin:tiny"],
         r"^model.lora.export='adapter': an adapter needs a base model"),
        (["trainer.strategy=fsdp"], r"^trainer.strategy='fsdp': LoRA runs do not shard yet"),
    ],
)
def test_bad_lora_settings_fail_at_load_in_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config("experiments/tiny.yaml", overrides=ON + overrides)
    assert "\n" not in str(info.value)


def test_lora_rules_apply_only_when_enabled():
    cfg = load_config("experiments/tiny.yaml", overrides=["model.lora.rank=0"])
    assert not cfg.model.lora.enabled
    assert load_config("experiments/tiny.yaml", overrides=ON).model.lora.target_modules[0] == "q_proj"
