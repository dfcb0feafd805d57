from __future__ import annotations

import subprocess
import sys

import pytest

from dlm.cli.main import main


def test_attention_demo_prints_all_patterns(capsys):
    assert main(["attention-demo", "--seq-len", "4", "--block-size", "2"]) == 0
    out = capsys.readouterr().out
    for header in ("causal (L=4, block_size=2)", "bidirectional (L=4, block_size=2)", "block (L=4, block_size=2)",
                   "block_clean (L=4, block_size=2, clean_context=block)"):
        assert header in out
    assert "  c3 ....####" in out  # clean half of block_clean is block-causal


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "experiments/tiny.yaml", "attention.block_size=8"]) == 0
    out = capsys.readouterr().out
    assert "block_size: 8" in out and "pattern: block_clean" in out


def test_bad_config_is_one_error_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "dlm", "config", "experiments/tiny.yaml", "attention.pattern=blok"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: attention.pattern='blok': unknown pattern; allowed: bidirectional, block, block_clean, block_window, "
        "causal"
    ]


def test_help_builds_every_parser_without_importing_torch():
    code = "import sys; from dlm.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_an_unexpected_exception_is_one_line_with_exit_1_and_its_traceback_behind_debug(capsys):
    from dlm.cli import main as cli

    def boom(args):
        raise RuntimeError("disk on fire\nsecond line")

    assert cli.run_reporting_errors(lambda: boom(None)) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: unexpected RuntimeError: disk on fire second line "
                                "(the traceback: --debug or DLM_DEBUG=1)"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.run_reporting_errors(lambda: boom(None), debug=True)


def test_debug_flag_and_environment_variable_reach_the_parser(monkeypatch):
    from dlm.cli.main import build_parser

    assert build_parser().parse_args(["--debug", "attention-demo"]).debug
    assert build_parser().parse_args(["attention-demo", "--debug"]).debug
    assert not build_parser().parse_args(["attention-demo"]).debug
    monkeypatch.setenv("DLM_DEBUG", "1")
    assert build_parser().parse_args(["attention-demo"]).debug
