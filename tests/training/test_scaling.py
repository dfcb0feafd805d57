import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecision

from dlm.settings import load_config
from dlm.settings.scaling import FSDPConfig
from dlm.tensor import patterns
from dlm.tensor.attention import build_attention_inputs
from dlm.training.module import DiffusionLM
from dlm.training.scaling import build_strategy, enable_activation_checkpointing, mixed_precision

ROOT = Path(__file__).resolve().parents[2]


def _grads(pattern: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    cfg = load_config("experiments/tiny_ar.yaml", overrides=[f"attention.pattern={pattern}", "data.max_length=16"])
    torch.manual_seed(0)
    module = DiffusionLM(cfg)
    if checkpointing:
        enable_activation_checkpointing(module.model)
    ids = torch.randint(0, module.mask_token_id, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs = module.pattern.model_input(ids.clone().fill_(module.mask_token_id), ids)
    module(inputs).float().square().mean().backward()
    return {n: p.grad for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("pattern", ["block_clean", "causal"])
def test_activation_checkpointing_gives_the_same_gradients(pattern):
    plain, checkpointed = _grads(pattern, False), _grads(pattern, True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_recomputes_each_decoder_layer():
    cfg = load_config("experiments/tiny_ar.yaml", overrides=["data.max_length=16"])
    module = DiffusionLM(cfg)
    enable_activation_checkpointing(module.model)
    calls = []
    for layer in module.model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 100, (1, 16))
    attn = build_attention_inputs(patterns.get("causal", block_size=4), batch_size=1, seq_len=16)
    module.model(input_ids=ids, **attn.as_kwargs(), use_cache=False).logits.sum().backward()
    assert len(calls) == 2 * len(module.model.model.layers)  # forward + recompute in backward (mask passed again)


def test_fsdp_strategy_wraps_and_checkpoints_per_decoder_layer():
    cfg = load_config("experiments/tiny_ar.yaml", overrides=[
        "trainer.strategy=fsdp", "trainer.activation_checkpointing=true",
        "trainer.fsdp.sharding_strategy=SHARD_GRAD_OP"])
    model = DiffusionLM(cfg).model
    strategy = build_strategy(cfg, model)
    assert {c.__name__ for c in strategy.kwargs["auto_wrap_policy"]._module_classes} == {"Qwen3DecoderLayer"}
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert build_strategy(load_config("experiments/tiny_ar.yaml", overrides=["trainer.strategy=ddp"]), model) == "ddp"


def test_fsdp2_is_lightnings_model_parallel_strategy_over_data_parallel_ranks():
    cfg = load_config("experiments/tiny_ar.yaml", overrides=["trainer.strategy=fsdp2", "trainer.devices=2"])
    strategy = build_strategy(cfg, DiffusionLM(cfg).model)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)


def test_fsdp_mixed_precision_from_settings():
    assert mixed_precision(FSDPConfig(), "bf16-true") is None  # Lightning's rule from trainer.precision
    mp = mixed_precision(FSDPConfig(reduce_dtype="float32"), "bf16-mixed")
    assert mp == MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)


def _run(tmp_path: Path, strategy: str, devices: int, *overrides: str) -> dict:
    out = tmp_path / f"{strategy}{devices}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "tests/training/sharded_run.py", str(out), strategy, str(devices), *overrides],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_two_gloo_processes_sharded_per_layer_train_like_one(tmp_path):
    """FSDP2 through Lightning on CPU (FSDP1 is GPU-only), one unit per decoder layer + the root, checkpointed per
    layer: the same losses and weights as one process on the full batch."""
    single = _run(tmp_path, "auto", 1)
    sharded = _run(tmp_path, "fsdp2", 2, "trainer.activation_checkpointing=true")
    assert sharded["wrapped"] == "'ModelParallelStrategy'" and sharded["fsdp_units"] == 4 + 1
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert sharded["weight_norm"] == pytest.approx(single["weight_norm"], rel=1e-5)
