"""`dlm.settings.eval`: `dlm eval` settings (limit as a count or a fraction, decoder overrides checked
before any model loads, one-line errors), and the sweep's `eval:` / `bench:` sections built on them."""

from __future__ import annotations

import dataclasses

import pytest

from dlm.settings import BenchConfig, ConfigError, DecodeConfig, EvalConfig
from dlm.settings.loading import merge
from dlm.settings.sweep import SweepBench, SweepConfig, SweepEval

DECODE_KEYS = ("mode, block_size, threshold, max_new_tokens, sub_block_size, temperature, top_p, policy, factor, "
               "tokens_per_pass, one_token_per_forward, use_cache, cache, early_exit, compile, speculative_form, "
               "speculative_branches")


def test_eval_defaults():
    cfg = EvalConfig()
    assert cfg.tasks == ["gsm8k_synthetic"] and cfg.decode == {} and cfg.dtype == "float32"
    assert (cfg.num_fewshot, cfg.limit, cfg.batch_size, cfg.gen_kwargs) == (None, None, 1, None)
    assert (cfg.apply_chat_template, cfg.log_samples, cfg.hub_tasks) == (None, False, False)  # None: as trained
    assert (cfg.data_dir, cfg.output, cfg.device) == (None, None, None)


# -- limit_value -----------------------------------------------------------------------------------
def test_limit_value_is_none_without_a_limit():
    assert EvalConfig().limit_value is None


@pytest.mark.parametrize("limit, expected", [(1, 1), (1.0, 1), (20.0, 20), (500, 500)])
def test_limit_value_of_a_whole_number_is_an_int_count(limit, expected):
    value = EvalConfig(limit=limit).limit_value
    assert value == expected and type(value) is int


@pytest.mark.parametrize("limit", [0.5, 0.01, 0.999])
def test_limit_value_below_one_is_the_fraction(limit):
    value = EvalConfig(limit=limit).limit_value
    assert value == limit and type(value) is float


# -- decode_overrides ------------------------------------------------------------------------------
def test_decode_overrides_returns_a_copy_of_valid_decoder_fields():
    cfg = EvalConfig(decode={"threshold": 0.5, "block_size": 16, "policy": "factor"})
    overrides = cfg.decode_overrides()
    assert overrides == {"threshold": 0.5, "block_size": 16, "policy": "factor"}
    overrides["threshold"] = 0.1
    assert cfg.decode["threshold"] == 0.5
    assert DecodeConfig(**overrides).threshold == 0.1


@pytest.mark.parametrize("key", ["treshold", "shift", "pattern"])
def test_decode_overrides_reject_unknown_keys_in_one_line(key):
    with pytest.raises(ConfigError, match=rf"^eval\.decode\.{key}: unknown key; allowed: {DECODE_KEYS}$"):
        EvalConfig(decode={key: 1})


@pytest.mark.parametrize("decode, match", [
    ({"threshold": 2}, r"decode\.threshold=2: must be in \(0, 1\]"),
    ({"block_size": 0}, r"decode\.block_size=0: must be a positive integer"),
    ({"block_size": 32, "sub_block_size": 5}, r"decode\.sub_block_size=5: must divide decode\.block_size=32; "
                                              r"allowed: 1, 2, 4, 8, 16, 32"),
    ({"policy": "greedy"}, r"decode\.policy='greedy': unknown policy; allowed: threshold, factor, fixed$"),
])
def test_decode_overrides_reject_bad_values_in_one_line_under_the_eval_prefix(decode, match):
    with pytest.raises(ConfigError, match=rf"^eval\.{match}$"):
        EvalConfig(decode=decode)


# -- the other checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"tasks": []}, r"eval\.tasks=\[\]: no task given; e\.g\. gsm8k,mmlu"),
    ({"limit": 0}, r"eval\.limit=0: must be > 0 \(a fraction if < 1\)"),
    ({"limit": -0.5}, r"eval\.limit=-0\.5: must be > 0 \(a fraction if < 1\)"),
    ({"num_fewshot": -1}, r"eval\.num_fewshot=-1: must be >= 0"),
    ({"batch_size": 0}, r"eval\.batch_size=0: must be a positive integer"),
])
def test_bad_values_fail_in_one_line(change, match):
    with pytest.raises(ConfigError, match=rf"^{match}$"):
        EvalConfig(**change)


def test_zero_shot_is_allowed():
    assert EvalConfig(num_fewshot=0).num_fewshot == 0


# -- the sweep's eval: and bench: sections ---------------------------------------------------------
def extra_fields(cls: type, base: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(base)}


def test_sweep_eval_has_eval_defaults_plus_enabled():
    sweep, plain = SweepEval(), EvalConfig()
    for f in dataclasses.fields(EvalConfig):
        assert getattr(sweep, f.name) == getattr(plain, f.name), f.name
    assert extra_fields(SweepEval, EvalConfig) == {"enabled", "decode_block_sizes", "metric"}
    assert sweep.enabled is True and sweep.decode_block_sizes == []


def test_sweep_bench_has_bench_defaults_plus_enabled():
    sweep, plain = SweepBench(), BenchConfig()
    for f in dataclasses.fields(BenchConfig):
        assert getattr(sweep, f.name) == getattr(plain, f.name), f.name
    assert extra_fields(SweepBench, BenchConfig) == {"enabled"}
    assert sweep.enabled is True


def test_sweep_sections_run_the_inherited_checks():
    with pytest.raises(ConfigError, match=r"^eval\.batch_size=0: must be a positive integer$"):
        SweepEval(batch_size=0)
    with pytest.raises(ConfigError, match=r"^eval\.decode\.treshold: unknown key; allowed: "):
        SweepEval(decode={"treshold": 0.5})
    with pytest.raises(ConfigError, match=r"^bench\.warmup=-1: must be >= 0$"):
        SweepBench(warmup=-1)
    with pytest.raises(ConfigError, match=r"^eval\.decode_block_sizes=\[4, 0\]: must be positive integers$"):
        SweepEval(decode_block_sizes=[4, 0])


def test_a_sweep_file_without_eval_or_bench_sections_gets_the_defaults():
    sweep = merge(SweepConfig, [{"name": "s", "experiment": "e.yaml"}])
    assert sweep.eval == SweepEval() and sweep.bench == SweepBench()
    partial = merge(SweepConfig, [{"name": "s", "experiment": "e.yaml", "eval": {"limit": 10, "enabled": False}}])
    assert partial.eval == SweepEval(limit=10, enabled=False) and partial.eval.limit_value == 10
