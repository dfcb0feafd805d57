"""scripts/gpu_check.sh: refuses in one line without CUDA (writing nothing); its report reads the steps' files;
the wheelhouse list is what the node lacks; the rehearsal's tiny presets load."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from dlm.experiments.train_bench import TrainSpeed, format_rows

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_in_one_line_without_cuda(tmp_path):
    env = dict(os.environ, PY=sys.executable, CUDA_VISIBLE_DEVICES="", OUT_DIR=str(tmp_path / "report"),
               SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: gpu-check needs a CUDA device (torch.cuda.is_available() is False here); run it on a GPU machine"]
    assert proc.stdout == "" and not (tmp_path / "report").exists() and not (tmp_path / "site").exists()


def test_make_gpu_check_runs_the_script():
    assert "bash scripts/gpu_check.sh" in (REPO / "Makefile").read_text().split("gpu-check:", 1)[1]


def test_report_gathers_the_step_files(tmp_path):
    (tmp_path / "steps.tsv").write_text("pytest_cuda\t0\t41\t60\ndecode_smollm2-135m\t124\t60\t60\n")
    (tmp_path / "pytest_cuda.txt").write_text("....\n6 passed in 40.1s\n")
    (tmp_path / "flex.json").write_text(json.dumps([{"pattern": "block_clean", "clean_context": "causal",
                                                     "document_mask": True, "against": "flex",
                                                     "logits_max_abs_diff": 1e-5, "grad_rel_diff": 2e-6, "ok": True}]))
    (tmp_path / "decode_smollm2-135m.log").write_text("loading\n| setting | batch |\n|---|---|\nmax new tokens 64\n")
    (tmp_path / "bench_train_causal_sdpa.md").write_text(format_rows([TrainSpeed("causal", 51234.0, 0.41, 3.2)]))
    assert _script().report(str(tmp_path)) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["steps"][1] == {"step": "decode_smollm2-135m", "rc": "124", "seconds": "60", "budget": "60"}
    assert data["pytest_cuda"] == ["6 passed in 40.1s"]
    assert data["bench_train"]["causal_sdpa"] == [{"pattern": "causal", "tokens_per_sec": "51,234",
                                                   "vs_causal": "1.00x", "mfu": "41.0%"}]
    md = (tmp_path / "report.md").read_text()
    assert "| block_clean | causal | True | flex | 1.00e-05 | 2.00e-06 | True |" in md and "(missing)" in md
    assert "## decode_smollm2-135m (dlm bench, random weights, bf16)\n\n| setting | batch |\n|---|---|\nmax new" in md


def test_wheelhouse_ships_only_what_the_node_lacks_or_has_too_old():
    script = _script()
    node = {script._name(r): r for r in script._requirement_lines(script.NODE_PACKAGES)}
    pins = {script._name(r): r.split("==")[1] for r in script._requirement_lines(script.WHEELHOUSE)}
    assert pins["transformers"] == "5.25.0" and "omegaconf" in pins and "torch" not in pins
    for name, version in pins.items():  # a node package is shipped only where the node's version is refused
        if name in node:
            assert not Requirement(node[name]).specifier.contains(version), name
    assert not set(pins) & set(script.NOT_SHIPPED)


def test_check_requirements_leave_out_lm_eval_mlflow_and_submitit():
    names = {_script()._name(r) for r in _script().check_requirements()}
    assert {"torch", "transformers", "datasets", "omegaconf", "torchdata", "lightning"} <= names
    assert not names & {"lm-eval", "mlflow", "submitit"}


def _pip_report(**installs: str) -> dict:
    """The part of `pip install --dry-run --report` that wheelhouse-matches reads."""
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in installs.items()]}


def test_wheelhouse_matches_names_what_to_add_and_remove(tmp_path, capsys):
    script = _script()
    pins = dict(r.split("==") for r in script._requirement_lines(script.WHEELHOUSE))
    exact = tmp_path / "exact.json"
    exact.write_text(json.dumps(_pip_report(**pins)))
    assert script.wheelhouse_matches(str(exact)) == 0
    drifted = dict(pins, omegaconf="2.3.0", gguf="0.17.1")
    (tmp_path / "drift.json").write_text(json.dumps(_pip_report(**drifted)))
    assert script.wheelhouse_matches(str(tmp_path / "drift.json")) == 1
    assert capsys.readouterr().err.strip() == (
        "error: scripts/wheelhouse.txt: differs from what the node lacks (scripts/gpu_node_packages.txt); "
        "add: gguf==0.17.1, omegaconf==2.3.0; remove: omegaconf==2.4.0")


def test_rehearsal_presets_are_the_real_presets_at_a_tiny_shape(tmp_path):
    from dlm.settings import load_config

    _script().rehearsal_presets(str(tmp_path))
    smol = load_config(tmp_path / "smollm2-135m-random.yaml")
    real = load_config(REPO / "experiments" / "smollm2-135m-random.yaml")
    assert (smol.model.arch, real.model.arch) == ("llama", "llama")
    assert smol.model.config["hidden_size"] == 64 and real.model.config["hidden_size"] == 576
    assert smol.model.config["rope_theta"] == real.model.config["rope_theta"] == 100000.0
    assert smol.trainer.accelerator == "cpu" and smol.attention.pattern == real.attention.pattern == "block_clean"
    assert load_config(tmp_path / "qwen2.5-0.5b-random.yaml").model.arch == "qwen2"


def test_smollm2_random_preset_has_smollm2_135m_parameter_count():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dlm.settings import load_config

    cfg = load_config(REPO / "experiments" / "smollm2-135m-random.yaml")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg.model.config))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # the GGUF model's count (DESIGN.md §4)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
