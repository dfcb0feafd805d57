"""`dlm eval`: offline GSM8K/MMLU/synthetic tasks through lm-eval end to end, MLflow, errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import mlflow
import pytest
import torch
from lm_eval.tasks._yaml_loader import load_yaml

from dlm.data import synthetic
from dlm.settings.experiment import ConfigError, DataConfig
from dlm.data.datamodule import synthetic_dir
from dlm.decoding.engine import DecodeConfig
from dlm.evaluation.evaluate import (
    DECODE_FLAGS, EVALS_DIR, add_eval_arguments, evaluate, gsm8k_synthetic_dataset, metrics_from_results,
    prepare_tasks, resolve_tasks, run_from_args,
)
from tests.conftest import save_tiny, sharp_backbone

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"
STOCK = Path(lm_eval.__file__).parent / "tasks"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k/test.jsonl").is_file() or not (DATA / "mmlu/test.jsonl").is_file(),
                                reason=f"no benchmark data at {DATA} (../shared/data from the repo root)")
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset"}
"""What a local variant may change: its name and where the data comes from."""

pytestmark = pytest.mark.usefixtures("one_thread")


def save_sharp(tokenizer, path: Path, pattern: str, chat_template: str | None = None) -> Path:
    """A random tiny Qwen3 in float64, lm_head sharpened x30 so it generates (not EOS first) and no
    padding noise can flip an argmax between batch sizes."""
    bb = sharp_backbone("qwen3", tokenizer)
    bb.tokenizer.chat_template = chat_template
    try:
        return save_tiny(bb, path, pattern)
    finally:
        bb.tokenizer.chat_template = None


@pytest.fixture(scope="module")
def dlm_ckpt(tokenizer, tmp_path_factory):
    return save_sharp(tokenizer, tmp_path_factory.mktemp("ckpt") / "block_clean", "block_clean")


@pytest.fixture(scope="module")
def ar_ckpt(tokenizer, tmp_path_factory):
    return save_sharp(tokenizer, tmp_path_factory.mktemp("ckpt") / "causal", "causal")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow store for the module: creating its sqlite tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def synthetic_metadata(tmp_path: Path) -> dict:
    return {"synthetic_size": 400, "cache_dir": str(tmp_path / "data")}


@needs_data
def test_gsm8k_runs_offline_from_the_command_line_and_logs_to_mlflow(dlm_ckpt, tmp_path, tracking_uri, capsys):
    uri = tracking_uri
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(dlm_ckpt), "--tasks", "gsm8k", "--limit", "20", "--batch-size", "4",
                              "--decode.max_new_tokens", "16", "--decode.threshold", "0.9", "--data-dir", str(DATA),
                              "--output", str(tmp_path / "results.json"), "--mlflow-run", run_id, "--tracking-uri", uri])
    results = run_from_args(args)
    written = json.loads((tmp_path / "results.json").read_text())
    scores = written["results"]["gsm8k_local"]  # the offline variant ran
    assert written["n-samples"]["gsm8k_local"]["effective"] == 20
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(scores)
    assert written["config"]["decode"]["max_new_tokens"] == 16 and written["config"]["decode"]["block_size"] == 4
    logged = client.get_run(run_id).data.metrics
    for name, key in (("eval/gsm8k/exact_match_strict-match", "exact_match,strict-match"),
                      ("eval/gsm8k/exact_match_flexible-extract", "exact_match,flexible-extract")):
        assert logged[name] == results["dlm_metrics"][name] == scores[key]
    assert [a.path for a in client.list_artifacts(run_id, "lm_eval")] == ["lm_eval/results.json"]
    assert "eval/gsm8k/exact_match_strict-match:" in capsys.readouterr().out


@needs_data
def test_mmlu_subjects_report_acc_through_loglikelihood(ar_ckpt, dlm_ckpt):
    for ckpt in (dlm_ckpt, ar_ckpt):
        results = evaluate(ckpt, "mmlu_anatomy,mmlu_astronomy", limit=2, data_dir=DATA, log_samples=True)
        for subject in ("anatomy", "astronomy"):
            samples = results["samples"][f"mmlu_local_{subject}"]
            assert [len(s["resps"]) for s in samples] == [4, 4]  # one loglikelihood per choice A-D
            picks = [max(range(4), key=lambda k: s["resps"][k][0][0]) for s in samples]
            acc = sum(p == s["doc"]["answer"] for p, s in zip(picks, samples)) / 2
            assert results["dlm_metrics"][f"eval/mmlu_{subject}/acc"] == acc


@needs_data
def test_batch_size_one_and_four_give_identical_samples(dlm_ckpt, tmp_path):
    runs = [evaluate(dlm_ckpt, "gsm8k_synthetic,mmlu_anatomy", limit=4, batch_size=bs, decode={"max_new_tokens": 12},
                     data_dir=DATA, task_metadata=synthetic_metadata(tmp_path), log_samples=True, dtype="float64")
            for bs in (1, 4)]
    one, four = ({task: [s["resps"] for s in samples] for task, samples in r["samples"].items()} for r in runs)
    assert one["gsm8k_synthetic"] == four["gsm8k_synthetic"]
    assert any(resps[0][0].strip() for resps in one["gsm8k_synthetic"])  # the model did generate something
    for a, b in zip(one["mmlu_local_anatomy"], four["mmlu_local_anatomy"]):
        torch.testing.assert_close(torch.tensor([r[0][0] for r in a]), torch.tensor([r[0][0] for r in b]))
    assert runs[0]["dlm_metrics"] == runs[1]["dlm_metrics"]


def test_synthetic_task_scores_the_held_out_split_with_the_training_prompt(tmp_path):
    meta = synthetic_metadata(tmp_path)
    dataset = gsm8k_synthetic_dataset(**meta)
    held_out = [json.loads(line) for line in (synthetic_dir(DataConfig(synthetic_size=400, cache_dir=meta["cache_dir"]))
                                              / "test.jsonl").read_text().splitlines()]
    assert dataset["test"]["question"] == [r["question"] for r in held_out]
    assert all(dataset["train"]["question"])  # no free-text rows among few-shot candidates
    manager, runs = prepare_tasks("gsm8k_synthetic", task_metadata=meta)
    task = manager.load(["gsm8k_synthetic"])["tasks"]["gsm8k_synthetic"]
    doc = task.test_docs()[0]
    assert task.doc_to_text(doc) == synthetic.format_example(doc)["prompt"]
    assert task.config.num_fewshot == 0 and task.config.generation_kwargs["max_gen_toks"] == 64


def test_local_variants_keep_the_stock_prompts_filters_metrics_and_splits():
    stock = load_yaml(STOCK / "gsm8k/gsm8k.yaml", resolve_func=False)
    local = load_yaml(EVALS_DIR / "gsm8k_local.yaml", resolve_func=False)
    assert {k: v for k, v in stock.items() if k not in DATA_KEYS} == {k: v for k, v in local.items() if k not in DATA_KEYS}
    subjects = sorted((STOCK / "mmlu/default").glob("mmlu_*.yaml"))
    assert len(subjects) == 57
    for path in subjects:
        stock = load_yaml(path, resolve_func=False)
        local = load_yaml(EVALS_DIR / "mmlu_local" / path.name.replace("mmlu_", "mmlu_local_", 1), resolve_func=False)
        assert local["dataset_kwargs"] == {"subject": stock["dataset_name"]}
        assert local["tag"] == stock["tag"].replace("mmlu_", "mmlu_local_", 1)
        assert {k: v for k, v in stock.items() if k not in DATA_KEYS} == {k: v for k, v in local.items() if k not in DATA_KEYS}
    for path in (STOCK / "mmlu/default").glob("_mmlu*.yaml"):
        twin = EVALS_DIR / "mmlu_local" / path.name.replace("mmlu", "mmlu_local", 1)
        stock, local = (load_yaml(p, resolve_func=False) for p in (path, twin))
        assert local["aggregate_metric_list"] == stock["aggregate_metric_list"]
        assert local["task"] == [t.replace("mmlu", "mmlu_local", 1) for t in stock["task"]]


def test_stock_names_map_to_local_variants_only_where_the_data_is(tmp_path, monkeypatch):
    local = {"gsm8k_local", "mmlu_local", "mmlu_local_anatomy", "mmlu_local_stem"}
    names = ["gsm8k", "mmlu", "mmlu_anatomy", "mmlu_stem", "mmlu_pro", "hellaswag"]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k/test.jsonl").write_text("")
    got = resolve_tasks(names[:1], local_names=local, data_dir=tmp_path)
    assert got == {"gsm8k": "gsm8k_local"}
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert list(resolve_tasks(names, local_names=local, data_dir=tmp_path).values()) == \
        ["gsm8k_local", "mmlu", "mmlu_anatomy", "mmlu_stem", "mmlu_pro", "hellaswag"]  # no mmlu data: the hub
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu/test.jsonl").write_text("")
    assert list(resolve_tasks(names, local_names=local, data_dir=tmp_path).values()) == \
        ["gsm8k_local", "mmlu_local", "mmlu_local_anatomy", "mmlu_local_stem", "mmlu_pro", "hellaswag"]
    assert resolve_tasks(names, local_names=local, data_dir=tmp_path, local=False) == {n: n for n in names}
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^tasks='gsm8k': offline \(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE\) but no "
                                          r"gsm8k/test.jsonl in data_dir=None; allowed: --data-dir or \$DLM_DATA_DIR"):
        resolve_tasks(["gsm8k"], local_names=local, data_dir=None)


def test_metric_names_carry_the_filter_and_are_mlflow_safe():
    results = {"results": {
        "gsm8k_local": {"alias": "gsm8k_local", "sample_len": 3, "exact_match,strict-match": 0.25,
                        "exact_match_stderr,strict-match": "N/A", "exact_match,flexible-extract": 0.5},
        "mmlu_local_anatomy": {"acc,none": 0.75, "acc_stderr,none": 0.1},
        "odd task": {"f1,my:filter": 1.0}},
        "config": {"tokens_per_forward": 2.5}}
    assert metrics_from_results(results, {"gsm8k_local": "gsm8k", "mmlu_local": "mmlu"}) == {
        "eval/gsm8k/exact_match_strict-match": 0.25, "eval/gsm8k/exact_match_flexible-extract": 0.5,
        "eval/mmlu_anatomy/acc": 0.75, "eval/mmlu_anatomy/acc_stderr": 0.1, "eval/odd task/f1_my_filter": 1.0,
        "eval/tokens_per_forward": 2.5}


def test_unknown_task_fails_in_one_line_before_the_model_loads(dlm_ckpt):
    message = r"^tasks='gsm8k_lcoal': unknown task \(did you mean 'gsm8k_local'\?\); allowed: gsm8k, mmlu"
    with pytest.raises(ConfigError, match=message):
        evaluate(dlm_ckpt, "gsm8k_lcoal", data_dir=DATA if DATA.is_dir() else None)


def test_tracking_uri_alone_records_a_new_eval_run_and_a_missing_run_fails_first(dlm_ckpt, tmp_path, tracking_uri):
    uri = tracking_uri
    with pytest.raises(ConfigError, match=r"^mlflow_run='nope': no such run in tracking_uri="):
        evaluate(dlm_ckpt, "gsm8k_synthetic", mlflow_run="nope", tracking_uri=uri)
    results = evaluate(dlm_ckpt, "gsm8k_synthetic", limit=1, gen_kwargs="max_gen_toks=4", tracking_uri=uri,
                       task_metadata=synthetic_metadata(tmp_path))
    run = mlflow.MlflowClient(uri).get_run(results["mlflow_run"])
    assert run.info.status == "FINISHED" and run.data.params["tasks"] == "gsm8k_synthetic"
    assert run.data.params["decode.block_size"] == "4"  # the checkpoint's training block size
    assert run.data.metrics["eval/gsm8k_synthetic/exact_match_strict-match"] == 0.0


def test_checkpoint_without_dlm_yaml_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint=.*: no dlm.yaml; not a dlm checkpoint"):
        evaluate(tmp_path, "gsm8k")


def test_decode_flags_are_decode_config_fields_and_reach_the_decoder(dlm_ckpt, tmp_path):
    fields = {f.name for f in dataclasses.fields(DecodeConfig)} - {"shift"}
    assert set(DECODE_FLAGS) == fields
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [str(dlm_ckpt), "--tasks", "x", "--decode.threshold", "0.5", "--decode.use_cache", "false",
         "--decode.sub_block_size", "2"])
    parsed = (args.decode_threshold, args.decode_use_cache, args.decode_sub_block_size, args.decode_block_size)
    assert parsed == (0.5, False, 2, None)
    with pytest.raises(SystemExit):
        add_eval_arguments(argparse.ArgumentParser()).parse_args([str(dlm_ckpt), "--tasks", "x", "--decode.use_cache", "maybe"])


def test_chat_template_shapes_the_prompts_when_asked(tokenizer, tmp_path):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    ckpt = save_sharp(tokenizer, tmp_path / "chat", "block_clean", chat_template=template)
    results = evaluate(ckpt, "gsm8k_synthetic", limit=1, gen_kwargs="max_gen_toks=4", apply_chat_template=True,
                       log_samples=True, task_metadata=synthetic_metadata(tmp_path))
    sample = results["samples"]["gsm8k_synthetic"][0]  # one entry per filter, same request
    ((prompt, gen_kwargs),) = sample["arguments"]
    assert prompt.startswith("<user>Question: ") and prompt.endswith("Answer:<assistant>")
    assert gen_kwargs["max_gen_toks"] == 4


@pytest.mark.slow  # ~20 s: lm-eval's CLI always indexes its ~15k built-in tasks
@needs_data
def test_stock_lm_eval_cli_runs_the_dlm_model_on_evals_tasks(dlm_ckpt, tmp_path):
    """The console script: `--model dlm` is found and built-in models are still there, from another cwd."""
    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "dlm.cli.lm_eval", "--model", "dlm", "--model_args",
           f"pretrained={dlm_ckpt},gen_length=8,threshold=0.9", "--tasks", "gsm8k_local", "--include_path", str(EVALS_DIR),
           "--limit", "2", "--num_fewshot", "0", "--device", "cpu", "--output_path", str(out),
           "--metadata", json.dumps({"data_dir": str(DATA)})]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gsm8k_local" in proc.stdout and "strict-match" in proc.stdout
    (written,) = out.rglob("results_*.json")
    assert "exact_match,strict-match" in json.loads(written.read_text())["results"]["gsm8k_local"]
