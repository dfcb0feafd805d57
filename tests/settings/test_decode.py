"""`dlm.settings.decode`: the parallel decoder's settings, each checked on construction in one line
(`decode.<field>=value: rule; allowed: ...`)."""

from __future__ import annotations

import dataclasses

import pytest

from dlm.settings import ConfigError, DecodeConfig
from dlm.settings.loading import merge


def test_defaults_are_greedy_threshold_decoding_with_the_cache():
    cfg = DecodeConfig()
    assert (cfg.block_size, cfg.threshold, cfg.max_new_tokens, cfg.sub_block_size) == (32, 0.9, 256, None)
    assert (cfg.temperature, cfg.top_p, cfg.policy, cfg.factor) == (0.0, 1.0, "threshold", 1.0)
    assert (cfg.one_token_per_forward, cfg.use_cache, cfg.shift) == (False, True, False)


def test_valid_edge_values_are_accepted():
    DecodeConfig(block_size=1, threshold=1.0, max_new_tokens=1, sub_block_size=1, temperature=0.0, top_p=1.0)
    DecodeConfig(threshold=1e-6, top_p=1e-6, temperature=2.0, policy="factor", factor=1e-3)


@pytest.mark.parametrize("block_size, sub_block_size", [(32, 32), (32, 8), (32, 1), (12, 3), (12, 6)])
def test_sub_block_size_dividing_block_size_is_accepted(block_size, sub_block_size):
    assert DecodeConfig(block_size=block_size, sub_block_size=sub_block_size).sub_block_size == sub_block_size


@pytest.mark.parametrize("change, match", [
    ({"block_size": 0}, r"decode\.block_size=0: must be a positive integer"),
    ({"block_size": -8}, r"decode\.block_size=-8: must be a positive integer"),
    ({"block_size": True}, r"decode\.block_size=True: must be a positive integer"),
    ({"threshold": 0}, r"decode\.threshold=0: must be in \(0, 1\]"),
    ({"threshold": 1.5}, r"decode\.threshold=1\.5: must be in \(0, 1\]"),
    ({"max_new_tokens": 0}, r"decode\.max_new_tokens=0: must be a positive integer"),
    ({"max_new_tokens": 2.5}, r"decode\.max_new_tokens=2\.5: must be a positive integer"),
    ({"temperature": -0.1}, r"decode\.temperature=-0\.1: must be >= 0 \(0 = greedy\)"),
    ({"top_p": 0}, r"decode\.top_p=0: must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"decode\.top_p=1\.01: must be in \(0, 1\]"),
    ({"factor": 0}, r"decode\.factor=0: must be > 0"),
    ({"factor": -1.0}, r"decode\.factor=-1\.0: must be > 0"),
    ({"policy": "x"}, r"decode\.policy='x': unknown policy; allowed: threshold, factor, fixed$"),
])
def test_bad_values_fail_in_one_line(change, match):
    with pytest.raises(ConfigError, match=rf"^{match}$"):
        DecodeConfig(**change)


@pytest.mark.parametrize("block_size, sub_block_size, allowed", [
    (32, 5, "1, 2, 4, 8, 16, 32"),
    (32, 64, "1, 2, 4, 8, 16, 32"),
    (32, 0, "1, 2, 4, 8, 16, 32"),
    (12, 5, "1, 2, 3, 4, 6, 12"),
    (7, 2, "1, 7"),
])
def test_sub_block_size_must_divide_block_size_and_lists_the_divisors(block_size, sub_block_size, allowed):
    rule = rf"must divide decode\.block_size={block_size}; allowed: {allowed}"
    with pytest.raises(ConfigError, match=rf"^decode\.sub_block_size={sub_block_size}: {rule}$"):
        DecodeConfig(block_size=block_size, sub_block_size=sub_block_size)


def test_replacing_a_field_checks_again():
    cfg = DecodeConfig(block_size=16, sub_block_size=4)
    assert dataclasses.replace(cfg, block_size=8).sub_block_size == 4
    with pytest.raises(ConfigError, match=r"^decode\.sub_block_size=4: must divide decode\.block_size=6; "
                                          r"allowed: 1, 2, 3, 6$"):
        dataclasses.replace(cfg, block_size=6)


def test_merged_from_overrides_the_same_checks_run():
    assert merge(DecodeConfig, [], ["threshold=0.5", "policy=factor"]) == DecodeConfig(threshold=0.5, policy="factor")
    with pytest.raises(ConfigError, match=r"^decode\.threshold=2\.0: must be in \(0, 1\]$"):
        merge(DecodeConfig, [], ["threshold=2"])


def test_auto_cache_is_static_except_for_speculative_decoding():
    assert DecodeConfig().static_cache and DecodeConfig(mode="ar").static_cache
    assert not DecodeConfig(mode="speculative", block_size=4).static_cache  # its holes would make it huge
    assert DecodeConfig(mode="speculative", block_size=4, cache="static").static_cache
    assert not DecodeConfig(cache="dynamic").static_cache and not DecodeConfig(use_cache=False).static_cache


def test_redundant_fields_are_aliases_with_one_deprecation_line(capsys):
    import dlm.settings.errors as errors

    errors._DEPRECATED.clear()
    one = DecodeConfig(one_token_per_forward=True)
    assert (one.policy, one.tokens_per_pass, one.one_token_per_forward) == ("fixed", 1, False)
    no_cache = DecodeConfig(use_cache=False)
    assert (no_cache.cache, no_cache.use_cache, no_cache.static_cache) == ("none", False, False)
    assert DecodeConfig(cache="none").use_cache is False
    dataclasses.replace(no_cache, threshold=0.5)  # rebuilt: no second line
    assert capsys.readouterr().err.splitlines() == [
        "deprecated: decode.one_token_per_forward=true; use decode.policy=fixed decode.tokens_per_pass=1",
        "deprecated: decode.use_cache=false; use decode.cache=none"]


@pytest.mark.parametrize("kw,label", [
    ({}, "fused"), (dict(speculative_form="separate"), "separate"), (dict(speculative_form="branched"), "branched"),
    (dict(speculative_form="branched", speculative_branches=1), "branched, 1 block"),
    (dict(speculative_form="branched", speculative_branches=2), "branched, 2 blocks")])
def test_the_speculative_label_names_the_form_and_its_blocks(kw, label):
    assert DecodeConfig(mode="speculative", block_size=4, **kw).speculative_label == label
