"""`dlm.settings.tracking`: an experiment's MLflow section, and `LogTarget`, the one definition of the
`--mlflow-run` / `--tracking-uri` flags that `dlm bench`, `dlm eval` and `dlm drift` share."""

from __future__ import annotations

import argparse

import pytest

from dlm.cli.dataclass_args import dataclass_from_args, given
from dlm.cli.main import build_parser
from dlm.settings import LogTarget, TrackingConfig
from dlm.settings.loading import flatten, merge

COMMANDS = {"bench": ["bench", "ckpt"], "eval": ["eval", "ckpt"], "drift": ["drift", "ckpt", "--reference", "ar"]}


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_tracking_defaults():
    cfg = TrackingConfig()
    assert (cfg.tracking_uri, cfg.experiment, cfg.run_name, cfg.tags) == (None, "dlm", None, {})


def test_tracking_tags_are_not_shared_between_instances():
    a, b = TrackingConfig(), TrackingConfig()
    a.tags["mlflow.parentRunId"] = "p"
    assert b.tags == {}


def test_tracking_merges_tags_and_flattens_them_to_dotted_keys():
    cfg = merge(TrackingConfig, [{"tags": {"team": "dlm"}}], ["run_name=r1", "tracking_uri=sqlite:///t.db"])
    assert cfg == TrackingConfig(tracking_uri="sqlite:///t.db", run_name="r1", tags={"team": "dlm"})
    assert flatten(cfg)["tags.team"] == "dlm"


def test_log_target_defaults_to_no_logging():
    assert LogTarget() == LogTarget(mlflow_run=None, tracking_uri=None)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_without_log_flags_build_the_default_log_target(command):
    args = build_parser().parse_args(COMMANDS[command])
    assert given(args, LogTarget) == {}
    assert dataclass_from_args(args, LogTarget) == LogTarget()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_accept_both_log_flags_and_build_an_equal_log_target(command):
    argv = [*COMMANDS[command], "--mlflow-run", "abc123", "--tracking-uri", "sqlite:///runs.db"]
    args = build_parser().parse_args(argv)
    assert dataclass_from_args(args, LogTarget) == LogTarget(mlflow_run="abc123", tracking_uri="sqlite:///runs.db")


def test_bench_takes_auto_as_the_run():
    args = build_parser().parse_args(["bench", "ckpt", "--mlflow-run", "auto"])
    assert dataclass_from_args(args, LogTarget) == LogTarget(mlflow_run="auto")


def test_the_log_flags_read_the_same_in_every_command():
    helps = {}
    for command in COMMANDS:
        actions = {a.dest: a for a in subparser(command)._actions}
        flags = (actions["mlflow_run"], actions["tracking_uri"])
        helps[command] = tuple((tuple(a.option_strings), a.help) for a in flags)
    assert len(set(helps.values())) == 1
    assert helps["bench"][0][0] == ("--mlflow-run",) and helps["bench"][1][0] == ("--tracking-uri",)
