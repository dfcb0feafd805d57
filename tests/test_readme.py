"""The README's cheap commands run as written (litgpt's test_readme idea), and every file it names exists, so the
docs cannot drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dlm.cli.main import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CHEAP = {"attention-demo", "config", "plan"}
"""Subcommands that load no weights and write nothing (plan: a meta-device model)."""


def _commands() -> list[list[str]]:
    """Every `dlm ...` command line of the README's bash blocks (continuations joined, comments dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in (".venv/bin/dlm", "dlm"):
                found.append(words[1:])
    return found


def _cheap(argv: list[str]) -> bool:
    return bool(argv) and argv[0] in CHEAP and "--measure" not in argv


CHEAP_COMMANDS = [argv for argv in _commands() if _cheap(argv)]


def test_the_readme_has_cheap_commands_to_run():
    assert {argv[0] for argv in CHEAP_COMMANDS} == CHEAP


@pytest.mark.parametrize("argv", CHEAP_COMMANDS, ids=" ".join)
def test_a_cheap_readme_command_runs(argv, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out


def test_every_config_the_readme_names_exists():
    named = set(re.findall(r"\b((?:experiments|sweeps)/[\w./-]+\.yaml)\b", README))
    assert named and [p for p in sorted(named) if not (REPO / p).is_file()] == []
