import pytest

from dlm.settings import ConfigError, load_config
from dlm.settings.scaling import GPUS, PlanConfig


def test_fsdp_settings_merge_from_overrides():
    cfg = load_config("experiments/qwen3-8b.yaml", overrides=["trainer.fsdp.sharding_strategy=SHARD_GRAD_OP",
                                                              "trainer.activation_checkpointing=true"])
    assert cfg.trainer.fsdp.sharding_strategy == "SHARD_GRAD_OP" and cfg.trainer.activation_checkpointing


def test_unknown_sharding_strategy_names_the_key():
    with pytest.raises(ConfigError, match=r"trainer.fsdp.sharding_strategy.*FULL_SHARD"):
        load_config("experiments/qwen3-8b.yaml", overrides=["trainer.fsdp.sharding_strategy=ZERO3"])


def test_plan_gpu_from_the_table_or_given():
    assert PlanConfig(gpu="h200").memory_bytes == GPUS["h200"][0] * 2**30
    custom = PlanConfig(gpu="mi300x", gpu_memory_gib=192, gpu_tflops=1300)
    assert custom.memory_bytes == 192 * 2**30 and custom.peak_flops == 1.3e15


@pytest.mark.parametrize("kw,match", [({"gpu": "h1000"}, r"plan.gpu='h1000': unknown GPU.*h100-80gb"),
                                      ({"mfu": 1.5}, r"plan.mfu=1.5"), ({"headroom": 0}, r"plan.headroom=0")])
def test_bad_plan_settings_are_one_line(kw, match):
    with pytest.raises(ConfigError, match=match):
        PlanConfig(**kw)
