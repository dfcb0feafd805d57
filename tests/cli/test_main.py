from __future__ import annotations

import subprocess
import sys

from dlm.cli.main import main


def test_attention_demo_prints_all_patterns(capsys):
    assert main(["attention-demo", "--seq-len", "4", "--block-size", "2"]) == 0
    out = capsys.readouterr().out
    for pattern in ("causal", "bidirectional", "block", "block_clean"):
        assert f"{pattern} (L=4, block_size=2)" in out
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
        "error: attention.pattern='blok': unknown pattern; allowed: causal, bidirectional, block, block_clean"
    ]


def test_help_builds_every_parser_without_importing_torch():
    code = "import sys; from dlm.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
