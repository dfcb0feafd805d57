"""`dlm.settings.bench`: `dlm bench` and `dlm bench-train` settings, their one-line errors, and the one
definition of their defaults (the command line shows and uses exactly these)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dlm.cli.dataclass_args import given
from dlm.cli.main import build_parser
from dlm.settings import PATTERNS, SYNTHETIC, BenchConfig, ConfigError, TrainBenchConfig
from dlm.settings.loading import merge

IN_RANGE = r"must be in \(0, 1\] \(1\.0 = one token per pass unless certain\)"


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


# -- BenchConfig -----------------------------------------------------------------------------------
def test_bench_defaults():
    cfg = BenchConfig()
    assert cfg.thresholds == [0.5, 0.7, 0.9, 1.0] and cfg.batch_sizes == [1, 4] and cfg.no_cache_thresholds == [0.9]
    assert (cfg.max_new_tokens, cfg.block_size, cfg.repeats, cfg.warmup, cfg.num_prompts) == (256, None, 3, 1, 16)
    assert (cfg.prompts, cfg.scored, cfg.ignore_eos, cfg.ar_baseline) == (SYNTHETIC, None, False, None)
    assert (cfg.device, cfg.threads, cfg.output_dir) == ("auto", None, None)


def test_bench_list_defaults_are_not_shared_between_instances():
    a, b = BenchConfig(), BenchConfig()
    a.thresholds.append(0.1)
    assert b.thresholds == [0.5, 0.7, 0.9, 1.0]


def test_bench_accepts_edge_values():
    BenchConfig(thresholds=[1.0], batch_sizes=[1], no_cache_thresholds=[], warmup=0, repeats=1, num_prompts=1,
                block_size=1, threads=1, max_new_tokens=1, few_shot=0)


@pytest.mark.parametrize("change, match", [
    ({"thresholds": [0.5, 1.5]}, rf"bench\.thresholds=1\.5: {IN_RANGE}"),
    ({"thresholds": [0]}, rf"bench\.thresholds=0: {IN_RANGE}"),
    ({"no_cache_thresholds": [-0.5]}, rf"bench\.no_cache_thresholds=-0\.5: {IN_RANGE}"),
    ({"thresholds": []}, r"bench\.thresholds=\[\]: need at least one threshold "
                         r"\(or bench\.tokens_per_pass, decoders, ar_mode\)"),
    ({"batch_sizes": []}, r"bench\.batch_sizes=\[\]: need at least one batch size"),
    ({"batch_sizes": [4, 0]}, r"bench\.batch_sizes=0: must be a positive integer"),
    ({"max_new_tokens": 0}, r"bench\.max_new_tokens=0: must be a positive integer"),
    ({"repeats": 0}, r"bench\.repeats=0: must be a positive integer"),
    ({"num_prompts": -1}, r"bench\.num_prompts=-1: must be a positive integer"),
    ({"block_size": 0}, r"bench\.block_size=0: must be a positive integer"),
    ({"threads": 0}, r"bench\.threads=0: must be a positive integer"),
    ({"warmup": -1}, r"bench\.warmup=-1: must be >= 0"),
    ({"few_shot": -1}, r"bench\.few_shot=-1: must be an integer >= 0"),
])
def test_bench_bad_values_fail_in_one_line(change, match):
    with pytest.raises(ConfigError, match=rf"^{match}$"):
        BenchConfig(**change)


# -- TrainBenchConfig ------------------------------------------------------------------------------
def test_train_bench_defaults():
    cfg = TrainBenchConfig()
    assert cfg.patterns == ["causal", "block", "block_clean"] and cfg.steps == 30
    assert set(cfg.patterns) <= set(PATTERNS)


def test_train_bench_accepts_every_pattern():
    assert TrainBenchConfig(patterns=list(PATTERNS), steps=1).patterns == list(PATTERNS)


@pytest.mark.parametrize("change, match", [
    ({"patterns": ["causal", "diagonal"]},
     r"bench_train\.patterns='diagonal': unknown pattern; allowed: bidirectional, block, block_clean, "
     r"block_window, causal"),
    ({"patterns": []}, r"bench_train\.patterns=\[\]: need at least one pattern"),
    ({"steps": 0}, r"bench_train\.steps=0: must be a positive integer"),
])
def test_train_bench_bad_values_fail_in_one_line(change, match):
    with pytest.raises(ConfigError, match=rf"^{match}$"):
        TrainBenchConfig(**change)


def test_train_bench_unknown_pattern_from_overrides_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"^bench_train.patterns='diagonal': unknown pattern; allowed: "
                                          r"bidirectional, block, block_clean, block_window, causal"):
        merge(TrainBenchConfig, [], ["patterns=[causal,diagonal]"])


# -- one definition of every default ---------------------------------------------------------------
def test_bench_cli_without_flags_builds_the_default_settings():
    args = build_parser().parse_args(["bench", "ckpt"])
    assert given(args, BenchConfig) == {}
    assert BenchConfig(**given(args, BenchConfig)) == BenchConfig()


def test_bench_cli_help_shows_the_dataclass_defaults():
    helps = {a.dest: a.help for a in subparser("bench")._actions if a.help != argparse.SUPPRESS}
    assert helps["thresholds"].endswith("(default: 0.5,0.7,0.9,1.0)")
    assert helps["batch_sizes"].endswith("(default: 1,4)")
    for f in dataclasses.fields(BenchConfig):
        default = getattr(BenchConfig(), f.name)
        shown = (",".join(map(str, default)) or "none") if isinstance(default, list) else str(default)
        assert helps[f.name].endswith(f"(default: {shown})"), f.name


def test_bench_cli_flags_build_the_same_settings_as_the_dataclass():
    args = build_parser().parse_args(["bench", "ckpt", "--thresholds", "0.5,0.9", "--gen-length", "64",
                                      "--no-score", "--ignore-eos", "--block-size", "8"])
    assert BenchConfig(**given(args, BenchConfig)) == BenchConfig(thresholds=[0.5, 0.9], max_new_tokens=64,
                                                                   scored=False, ignore_eos=True, block_size=8)


def test_bench_train_cli_without_flags_builds_the_default_settings():
    args = build_parser().parse_args(["bench-train", "experiments/tiny.yaml"])
    assert TrainBenchConfig(**given(args, TrainBenchConfig)) == TrainBenchConfig()
    args = build_parser().parse_args(["bench-train", "experiments/tiny.yaml", "--patterns", "block", "--steps", "2"])
    assert TrainBenchConfig(**given(args, TrainBenchConfig)) == TrainBenchConfig(patterns=["block"], steps=2)
