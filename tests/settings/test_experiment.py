from __future__ import annotations

import pytest

from dlm.settings import ConfigError, ExperimentConfig, flatten, load_config, save_config, to_yaml

TINY = "experiments/tiny.yaml"


def test_yaml_base_and_overrides_merge_onto_schema():
    cfg = load_config(TINY, overrides=["attention.block_size=8", "optim.lr=2e-4"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.attention.pattern == "block_clean"  # from tiny.yaml
    assert cfg.model.config["hidden_size"] == 128  # inherited from tiny_ar.yaml through `base:`
    assert cfg.attention.block_size == 8 and cfg.optim.lr == 2e-4
    assert cfg.output_dir == "outputs/tiny"  # interpolation resolved


def test_saved_config_reloads_exactly(tmp_path):
    cfg = load_config(TINY, overrides=["masking.half_life=0.25", "trainer.devices=2"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(path) == cfg
    assert to_yaml(load_config(path)) == to_yaml(cfg)


@pytest.mark.parametrize(
    "override,match",
    [
        ("attention.patern=block", r"^attention.patern: unknown key \(did you mean 'pattern'\?\); "
                                   r"allowed: pattern, block_size, backend, clean_context, "
                                   r"options, block_size_schedule$"),
        ("attention.block_size=abc", r"^attention.block_size='abc': Value 'abc' of type 'str' "
                                     r"could not be converted to Integer"),
        ("attention.pattern=blok", r"^attention.pattern='blok': unknown pattern; "
                                   r"allowed: bidirectional, block, block_clean, block_window, causal$"),
        ("attention.block_size=5", r"^attention.block_size=5: must divide data.max_length=96; "
                                   r"allowed: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96$"),
        ("attention.backend=xla", r"^attention.backend='xla': unknown backend"),
        ("masking.half_life=-1", r"^masking.half_life=-1.0: must be > 0"),
        ("masking.strategy=random", r"^masking.strategy='random': unknown strategy; allowed: uniform, position$"),
        ("objective.weighting=1/t", r"^objective.weighting='1/t': unknown weighting; allowed: elbo, none$"),
        ("trainer.precision=bf17", r"^trainer.precision='bf17': unknown precision"),
        ("data.document_mask=true attention.backend=flash", r"^attention.backend='flash': flash takes no mask"),
        ("attention.block_size_schedule=[[0,2],[10,5]]", r"^attention.block_size_schedule\[1\]=5: must divide "
                                                         r"data.max_length=96; allowed: 1, 2, 3, 4, 6, 8, 12"),
        ("attention.block_size_schedule=[[5,2]]", r"^attention.block_size_schedule=\[\[5, 2\]\]: stage steps must "
                                                  r"start at 0 and increase"),
        ("attention.block_size_schedule=[[0,2],[0,4]]", r"stage steps must start at 0 and increase"),
        ("attention.block_size_schedule=[[0,2,3]]", r"^attention.block_size_schedule=\[\[0, 2, 3\]\]: each stage is "
                                                    r"\[step, block_size\]"),
        ("attention.clean_context=token", r"^attention.clean_context='token': unknown clean_context; "
                                           r"allowed: block, causal$"),
        ("objective.ar_weight=-1", r"^objective.ar_weight=-1.0: must be >= 0"),
        ("objective.diffusion_weight=-0.5 attention.clean_context=causal objective.ar_weight=1",
         r"^objective.diffusion_weight=-0.5: must be >= 0"),
        ("objective.certainty_weight=-1", r"^objective.certainty_weight=-1.0: must be >= 0 \(0 = off\)$"),
        ("trainer.export_every_n_steps=-5", r"^trainer.export_every_n_steps=-5: must be an integer >= 0 "
                                            r"\(0 exports only the final folder\)$"),
        ("objective.certainty_temperature=0", r"^objective.certainty_temperature=0.0: must be > 0$"),
    ],
)
def test_bad_values_fail_at_load_in_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(TINY, overrides=override.split())
    assert "\n" not in str(info.value)


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="must be key=value"):
        load_config(TINY, overrides=["attention.block_size"])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="config='nope.yaml': file not found"):
        load_config("nope.yaml")


def test_from_scratch_model_needs_arch():
    with pytest.raises(ConfigError, match="model.name_or_path=None"):
        load_config(overrides=["model.arch=null"])


def test_flatten_gives_dotted_params():
    flat = flatten(load_config(TINY))
    assert flat["attention.pattern"] == "block_clean"
    assert flat["model.config.hidden_size"] == 128


@pytest.mark.parametrize("preset", sorted(p.name for p in __import__("pathlib").Path("experiments").glob("*.yaml")
                                          if p.name != "base.yaml"))
def test_every_shipped_preset_loads_and_validates(preset):
    cfg = load_config(f"experiments/{preset}")
    assert cfg.data.max_length % cfg.attention.block_size == 0


def test_block_size_schedule_gives_the_stage_at_each_step_and_pads_to_every_stage():
    cfg = load_config(TINY, overrides=["attention.block_size_schedule=[[0,2],[10,4],[20,6]]"])
    a = cfg.attention
    assert [a.block_size_at(s) for s in (0, 9, 10, 19, 20, 500)] == [2, 2, 4, 4, 6, 6]
    assert a.padding_block_size() == 12
    fixed = load_config(TINY).attention
    assert fixed.block_size_at(123) == fixed.block_size == fixed.padding_block_size() == 4
