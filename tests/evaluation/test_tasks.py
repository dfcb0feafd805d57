"""`dlm.evaluation.tasks`: the offline variants keep the stock tasks' prompts, stock names map to them only
where the data is, and the synthetic task is found with its run's metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks._yaml_loader import load_yaml

from dlm.data import synthetic
from dlm.evaluation.tasks import EVALS_DIR, prepare_tasks, resolve_tasks
from dlm.settings import ConfigError
from tests.evaluation.test_evaluate import synthetic_metadata

STOCK = Path(lm_eval.__file__).parent / "tasks"
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset"}
"""What a local variant may change: its name and where the data comes from."""


def test_synthetic_task_uses_the_training_prompt(tmp_path):
    manager, runs = prepare_tasks("gsm8k_synthetic", task_metadata=synthetic_metadata(tmp_path))
    task = manager.load(["gsm8k_synthetic"])["tasks"]["gsm8k_synthetic"]
    doc = task.test_docs()[0]
    assert runs == {"gsm8k_synthetic": "gsm8k_synthetic"}
    assert task.doc_to_text(doc) == synthetic.format_example(doc)["prompt"]
    assert task.config.num_fewshot == 0 and task.config.generation_kwargs["max_gen_toks"] == 64


def test_local_variants_keep_the_stock_prompts_filters_metrics_and_splits():
    stock = load_yaml(STOCK / "gsm8k/gsm8k.yaml", resolve_func=False)
    local = load_yaml(EVALS_DIR / "gsm8k_local.yaml", resolve_func=False)
    assert ({k: v for k, v in stock.items() if k not in DATA_KEYS}
            == {k: v for k, v in local.items() if k not in DATA_KEYS})
    subjects = sorted((STOCK / "mmlu/default").glob("mmlu_*.yaml"))
    assert len(subjects) == 57
    for path in subjects:
        stock = load_yaml(path, resolve_func=False)
        local = load_yaml(EVALS_DIR / "mmlu_local" / path.name.replace("mmlu_", "mmlu_local_", 1), resolve_func=False)
        assert local["dataset_kwargs"] == {"subject": stock["dataset_name"]}
        assert local["tag"] == stock["tag"].replace("mmlu_", "mmlu_local_", 1)
        assert ({k: v for k, v in stock.items() if k not in DATA_KEYS}
                == {k: v for k, v in local.items() if k not in DATA_KEYS})
    for path in (STOCK / "mmlu/default").glob("_mmlu*.yaml"):
        twin = EVALS_DIR / "mmlu_local" / path.name.replace("mmlu", "mmlu_local", 1)
        stock, local = (load_yaml(p, resolve_func=False) for p in (path, twin))
        assert local["aggregate_metric_list"] == stock["aggregate_metric_list"]
        assert local["task"] == [t.replace("mmlu", "mmlu_local", 1) for t in stock["task"]]


def test_stock_names_map_to_local_variants_and_missing_data_fails_in_one_line(tmp_path):
    local = {"gsm8k_local", "mmlu_local", "mmlu_local_anatomy", "mmlu_local_stem"}
    names = ["gsm8k", "mmlu", "mmlu_anatomy", "mmlu_stem", "mmlu_pro", "hellaswag"]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k/test.jsonl").write_text("")
    assert resolve_tasks(names[:1], local_names=local, data_dir=tmp_path) == {"gsm8k": "gsm8k_local"}
    with pytest.raises(ConfigError, match=r"^tasks='mmlu': its offline variant reads mmlu/test.jsonl from the data "
                                          r"folder, and data_dir='.*' has none; allowed: --data-dir DIR or "
                                          r"\$DLM_DATA_DIR \(a folder like ../shared/data\), or --hub-tasks"):
        resolve_tasks(names, local_names=local, data_dir=tmp_path)  # no mmlu data: no silent hub download
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu/test.jsonl").write_text("")
    assert list(resolve_tasks(names, local_names=local, data_dir=tmp_path).values()) == \
        ["gsm8k_local", "mmlu_local", "mmlu_local_anatomy", "mmlu_local_stem", "mmlu_pro", "hellaswag"]
    assert resolve_tasks(names, local_names=local, data_dir=tmp_path, hub=True) == {n: n for n in names}
    with pytest.raises(ConfigError, match=r"^tasks='gsm8k': .* data_dir=None has none"):
        resolve_tasks(["gsm8k"], local_names=local, data_dir=None)


def test_dlm_eval_without_the_data_folder_fails_in_one_line_within_a_second(tmp_path):
    """The whole command, with $DLM_DATA_DIR (looked up first) at a folder without the data: no hub retries."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "dlm.yaml").write_text("pattern: block_clean\nblock_size: 4\nmask_token: '<|mask|>'\nmask_token_id: 1\n")
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "DLM_DATA_DIR": str(tmp_path / "empty")}
    code = ("import sys, time; from dlm.cli.main import main; t = time.perf_counter(); "
            f"code = main(['eval', {str(ckpt)!r}, '--tasks', 'gsm8k']); "
            "print(f'status {code} in {time.perf_counter() - t:.2f} s')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    status, seconds = proc.stdout.split()[1], float(proc.stdout.split()[3])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert status == "2" and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "tasks='gsm8k': its offline variant reads gsm8k/test.jsonl" in errors[0] and seconds < 1.0
