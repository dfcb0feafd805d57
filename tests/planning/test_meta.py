import json
from pathlib import Path

import pytest
import torch

from dlm.planning.meta import architecture_config, count_saved, meta_backbone
from dlm.settings import ConfigError, load_config

ARCH = Path("experiments/architectures")


@pytest.mark.parametrize("preset,billions", [("qwen3-8b", 8.19), ("qwen3-4b", 4.02), ("qwen2.5-0.5b", 0.494),
                                             ("qwen2.5-1.5b", 1.54), ("llama3.2-1b", 1.24)])
def test_shipped_architectures_give_the_published_parameter_counts(preset, billions):
    cfg = load_config(f"experiments/{preset}.yaml")
    model = meta_backbone(architecture_config(cfg, ARCH), dtype=torch.bfloat16, kernel="flex")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)
    assert next(model.parameters()).device.type == "meta"


def test_a_local_checkpoint_folder_is_read_before_the_shipped_file(tmp_path):
    values = json.loads((ARCH / "Qwen--Qwen3-8B-Base.json").read_text()) | {"num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(values))
    cfg = load_config("experiments/qwen3-8b.yaml", overrides=[f"model.name_or_path={tmp_path}"])
    assert architecture_config(cfg, ARCH).num_hidden_layers == 2


def test_unknown_model_without_architecture_is_one_line():
    cfg = load_config("experiments/qwen3-8b.yaml", overrides=["model.name_or_path=org/unknown-7b"])
    with pytest.raises(ConfigError, match=r"model.name_or_path='org/unknown-7b': no architecture config.*Qwen/Qwen3"):
        architecture_config(cfg, ARCH)


def test_saved_activations_scale_with_positions_and_batch():
    """block_clean runs 2L positions: twice causal's activations per layer; two rows twice one."""
    base = ["data.max_length=32", "attention.block_size=4"]
    cfg = load_config("experiments/tiny_ar.yaml", overrides=base)
    clean = load_config("experiments/tiny_ar.yaml", overrides=[*base, "attention.pattern=block_clean"])
    model = meta_backbone(architecture_config(cfg, ARCH, vocab_size=64), dtype=torch.float32, kernel="flex")
    causal, noisy_clean = count_saved(model, cfg, batch_size=1), count_saved(model, clean, batch_size=1)
    assert noisy_clean.per_layer == 2 * causal.per_layer
    assert count_saved(model, cfg, batch_size=2).per_layer == 2 * causal.per_layer
    assert causal.layer_input == 32 * 128 * 4 and causal.layers == 4
