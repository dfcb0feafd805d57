"""The package installs anywhere: a wheel built from the repository and installed outside it carries its lm-eval
task YAMLs, and its CLI runs `dlm config` and `dlm eval --tasks gsm8k` away from the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _run(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DLM_DATA_DIR", "PYTHONPATH")}
    env |= {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this source tree installed (without dependencies: this venv has them) into its own folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: setuptools writes build/ into the tree it builds
    shutil.copytree(REPO / "dlm", source / "dlm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("dlm-*.whl")
    site = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    shutil.rmtree(tmp / "dist")
    shutil.rmtree(source)
    return site


def test_the_installed_package_is_imported_and_holds_its_task_yamls(installed, tmp_path):
    out = _run(["-c", "import dlm.evaluation.tasks as t; print(t.__file__); print(t.EVALS_DIR)"], tmp_path, installed)
    module, evals = out.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(evals).is_relative_to(installed)
    assert (Path(evals) / "gsm8k_local.yaml").is_file()
    assert len(list((Path(evals) / "mmlu_local").glob("mmlu_local_*.yaml"))) == 57


def test_config_runs_outside_the_source_tree(installed, tmp_path):
    for name in ("tiny_ar.yaml", "tiny.yaml"):
        shutil.copy(REPO / "experiments" / name, tmp_path / name)
    out = _run(["-m", "dlm.cli.main", "config", "tiny.yaml", "attention.pattern=block_window"], tmp_path, installed)
    assert out.returncode == 0, out.stderr
    assert "pattern: block_window" in out.stdout


@pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file(), reason="needs ../shared/data (GSM8K)")
def test_eval_of_gsm8k_runs_outside_the_source_tree(installed, tmp_path, ar_checkpoint):
    out = _run(["-m", "dlm.cli.main", "eval", str(ar_checkpoint), "--tasks", "gsm8k", "--data-dir", str(DATA),
                "--limit", "2", "--num-fewshot", "0", "--decode.max_new_tokens", "8", "--output",
                str(tmp_path / "results.json")], tmp_path, installed)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "results.json").is_file() and "gsm8k" in (tmp_path / "results.json").read_text()
