"""scripts/gpu_check.sh: refuses in one line without CUDA (writing nothing); its report reads the steps' files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from dlm.experiments.train_bench import TrainSpeed, format_rows

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_in_one_line_without_cuda(tmp_path):
    env = dict(os.environ, PY=sys.executable, CUDA_VISIBLE_DEVICES="", OUT_DIR=str(tmp_path / "report"))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: gpu-check needs a CUDA device (torch.cuda.is_available() is False here); run it on a GPU machine"]
    assert proc.stdout == "" and not (tmp_path / "report").exists()


def test_make_gpu_check_runs_the_script():
    assert "bash scripts/gpu_check.sh" in (REPO / "Makefile").read_text().split("gpu-check:", 1)[1]


def test_report_gathers_the_step_files(tmp_path):
    (tmp_path / "steps.tsv").write_text("pytest_cuda\t0\t41\nbench_decode\t1\t12\n")
    (tmp_path / "pytest_cuda.txt").write_text("....\n6 passed in 40.1s\n")
    (tmp_path / "flex.json").write_text(json.dumps([{"pattern": "block_clean", "document_mask": True,
                                                     "logits_max_abs_diff": 1e-5, "grad_rel_diff": 2e-6, "ok": True}]))
    (tmp_path / "bench_train_causal_sdpa.md").write_text(format_rows([TrainSpeed("causal", 51234.0, 0.41, 3.2)]))
    assert _script().report(str(tmp_path)) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["steps"][1] == {"step": "bench_decode", "rc": "1", "seconds": "12"}
    assert data["pytest_cuda"] == ["6 passed in 40.1s"]
    assert data["bench_train"]["causal_sdpa"] == [{"pattern": "causal", "tokens_per_sec": "51,234",
                                                   "vs_causal": "1.00x", "mfu": "41.0%"}]
    md = (tmp_path / "report.md").read_text()
    assert "| block_clean | True | 1.00e-05 | 2.00e-06 | True |" in md and "(missing)" in md
