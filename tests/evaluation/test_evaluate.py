"""`dlm eval`: offline GSM8K/MMLU/synthetic tasks through lm-eval end to end, MLflow, errors."""

from __future__ import annotations

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
import yaml

from dlm.cli.dataclass_args import given
from dlm.cli.main import build_parser
from dlm.evaluation.evaluate import evaluate, metrics_from_results
from dlm.evaluation.tasks import EVALS_DIR
from dlm.settings import ConfigError, DecodeConfig, EvalConfig, LogTarget
from tests.conftest import save_tiny, sharp_backbone

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"
STOCK = Path(lm_eval.__file__).parent / "tasks"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k/test.jsonl").is_file() or not (DATA / "mmlu/test.jsonl").is_file(),
                                reason=f"no benchmark data at {DATA} (../shared/data from the repo root)")

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


def ev(checkpoint, tasks: str, *, mlflow_run=None, tracking_uri=None, task_metadata=None, **settings):
    """`evaluate` with its settings as keywords, as `dlm eval` builds them."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    return evaluate(checkpoint, EvalConfig(tasks=tasks.split(","), **settings), log=LogTarget(mlflow_run, tracking_uri),
                    task_metadata=task_metadata)


def cli(*argv: str):
    """`dlm eval ARGV` through the real parser; returns what the command returns (results), errors raise."""
    args = build_parser().parse_args(["eval", *argv])
    return args.func(args)


@needs_data
def test_gsm8k_runs_offline_from_the_command_line_and_logs_to_mlflow(dlm_ckpt, tmp_path, tracking_uri, capsys):
    uri = tracking_uri
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    results = cli(str(dlm_ckpt), "--tasks", "gsm8k", "--limit", "20", "--batch-size", "4",
                  "--decode.max_new_tokens", "16", "--decode.threshold", "0.9", "--data-dir", str(DATA),
                  "--output", str(tmp_path / "results.json"), "--mlflow-run", run_id, "--tracking-uri", uri)
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
        results = ev(ckpt, "mmlu_anatomy,mmlu_astronomy", limit=2, data_dir=DATA, log_samples=True)
        for subject in ("anatomy", "astronomy"):
            samples = results["samples"][f"mmlu_local_{subject}"]
            assert [len(s["resps"]) for s in samples] == [4, 4]  # one loglikelihood per choice A-D
            picks = [max(range(4), key=lambda k: s["resps"][k][0][0]) for s in samples]
            acc = sum(p == s["doc"]["answer"] for p, s in zip(picks, samples)) / 2
            assert results["dlm_metrics"][f"eval/mmlu_{subject}/acc"] == acc


@needs_data
def test_batch_size_one_and_four_give_identical_samples(dlm_ckpt, tmp_path):
    runs = [ev(dlm_ckpt, "gsm8k_synthetic,mmlu_anatomy", limit=4, batch_size=bs, decode={"max_new_tokens": 12},
                     data_dir=DATA, task_metadata=synthetic_metadata(tmp_path), log_samples=True, dtype="float64")
            for bs in (1, 4)]
    one, four = ({task: [s["resps"] for s in samples] for task, samples in r["samples"].items()} for r in runs)
    assert one["gsm8k_synthetic"] == four["gsm8k_synthetic"]
    assert any(resps[0][0].strip() for resps in one["gsm8k_synthetic"])  # the model did generate something
    for a, b in zip(one["mmlu_local_anatomy"], four["mmlu_local_anatomy"]):
        torch.testing.assert_close(torch.tensor([r[0][0] for r in a]), torch.tensor([r[0][0] for r in b]))
    assert runs[0]["dlm_metrics"] == runs[1]["dlm_metrics"]


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
        ev(dlm_ckpt, "gsm8k_lcoal", data_dir=DATA if DATA.is_dir() else None)


def test_tracking_uri_alone_records_a_new_eval_run_and_a_missing_run_fails_first(dlm_ckpt, tmp_path, tracking_uri):
    uri = tracking_uri
    with pytest.raises(ConfigError, match=r"^mlflow_run='nope': no such run(; | in )tracking URI"):  # store or not
        ev(dlm_ckpt, "gsm8k_synthetic", mlflow_run="nope", tracking_uri=uri)
    results = ev(dlm_ckpt, "gsm8k_synthetic", limit=1, gen_kwargs="max_gen_toks=4", tracking_uri=uri,
                       task_metadata=synthetic_metadata(tmp_path))
    run = mlflow.MlflowClient(uri).get_run(results["mlflow_run"])
    assert run.info.status == "FINISHED" and run.data.params["tasks"] == "gsm8k_synthetic"
    assert run.data.params["decode.block_size"] == "4"  # the checkpoint's training block size
    assert run.data.metrics["eval/gsm8k_synthetic/exact_match_strict-match"] == 0.0


def test_checkpoint_without_dlm_yaml_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint=.*: no dlm.yaml and no config.json"):
        ev(tmp_path, "gsm8k")


def test_decode_flags_are_decode_config_fields_and_reach_the_decoder(dlm_ckpt, tmp_path):
    fields = {f.name for f in dataclasses.fields(DecodeConfig)} - {"shift"}
    parser = build_parser()
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    flags = {o.removeprefix("--decode.") for a in eval_parser._actions for o in a.option_strings
             if o.startswith("--decode.")}
    assert flags == fields
    args = parser.parse_args(["eval", str(dlm_ckpt), "--tasks", "x", "--decode.threshold", "0.5",
                              "--decode.use_cache", "false", "--decode.sub_block_size", "2"])
    assert given(args, DecodeConfig, prefix="decode.") == {"threshold": 0.5, "use_cache": False, "sub_block_size": 2}
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", str(dlm_ckpt), "--tasks", "x", "--decode.use_cache", "maybe"])
    with pytest.raises(ConfigError, match=r"^eval\.decode\.sub_block_size=3: must divide decode.block_size=32"):
        EvalConfig(decode={"sub_block_size": 3})


def test_chat_template_shapes_the_prompts_when_asked(tokenizer, tmp_path):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    ckpt = save_sharp(tokenizer, tmp_path / "chat", "block_clean", chat_template=template)
    results = ev(ckpt, "gsm8k_synthetic", limit=1, gen_kwargs="max_gen_toks=4", apply_chat_template=True,
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
           f"pretrained={dlm_ckpt},gen_length=8,threshold=0.9", "--tasks", "gsm8k_local",
           "--include_path", str(EVALS_DIR), "--limit", "2", "--num_fewshot", "0", "--device", "cpu",
           "--output_path", str(out), "--metadata", json.dumps({"data_dir": str(DATA)})]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gsm8k_local" in proc.stdout and "strict-match" in proc.stdout
    (written,) = out.rglob("results_*.json")
    assert "exact_match,strict-match" in json.loads(written.read_text())["results"]["gsm8k_local"]


@needs_data
def test_the_stock_hf_model_and_dlm_agree_on_a_causal_checkpoint(ar_ckpt):
    """lm-eval's own `hf` class (the AR baseline, lm-eval[hf]) beside ours on one AR checkpoint: the same
    per-choice log-likelihoods and the same MMLU accuracy."""
    from lm_eval import simple_evaluate

    from dlm.evaluation.tasks import prepare_tasks

    ours = ev(ar_ckpt, "mmlu_anatomy,mmlu_astronomy", limit=6, data_dir=DATA, log_samples=True, dtype="float64")
    manager, names = prepare_tasks("mmlu_anatomy,mmlu_astronomy", data_dir=DATA)
    stock = simple_evaluate(model="hf", model_args=f"pretrained={ar_ckpt},dtype=float64,device=cpu",
                            tasks=list(names.values()), task_manager=manager, limit=6, log_samples=True, batch_size=1)
    for task in names.values():
        mine = [[r[0][0] for r in s["resps"]] for s in ours["samples"][task]]
        theirs = [[r[0][0] for r in s["resps"]] for s in stock["samples"][task]]
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-4, rtol=0)
        assert ours["results"][task]["acc,none"] == stock["results"][task]["acc,none"]


def test_the_results_json_is_always_written_beside_the_checkpoint_with_samples_on_request(dlm_ckpt, tmp_path):
    results = ev(dlm_ckpt, "gsm8k_synthetic", limit=1, gen_kwargs="max_gen_toks=4", log_samples=True,
                 task_metadata=synthetic_metadata(tmp_path))
    path = Path(results["results_path"])
    assert path.parent == Path(dlm_ckpt).resolve().parent / "eval" and path.name.startswith("results_")
    saved = json.loads(path.read_text())
    assert saved["samples"]["gsm8k_synthetic"] and "exact_match,strict-match" in saved["results"]["gsm8k_synthetic"]


def test_a_checkpoint_trained_on_chat_data_is_evaluated_in_its_template_with_its_system_turn(tokenizer, tmp_path):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    ckpt = save_sharp(tokenizer, tmp_path / "chat", "block_clean")  # its tokenizer has no template of its own
    meta = yaml.safe_load((ckpt / "dlm.yaml").read_text()) | {"chat_template": template, "system_prompt": "Be brief."}
    (ckpt / "dlm.yaml").write_text(yaml.safe_dump(meta))
    results = ev(ckpt, "gsm8k_synthetic", limit=1, gen_kwargs="max_gen_toks=4", log_samples=True, dtype="bfloat16",
                 task_metadata=synthetic_metadata(tmp_path))  # apply_chat_template left unset: on for this one
    ((prompt, _),) = results["samples"]["gsm8k_synthetic"][0]["arguments"]
    assert prompt.startswith("<system>Be brief.<user>Question: ") and prompt.endswith("Answer:<assistant>")


def test_a_plain_hf_folder_is_evaluated_as_an_ar_model(tokenizer, tmp_path, capsys):
    bb = sharp_backbone("qwen3", tokenizer, dtype=torch.float32)
    bb.model.save_pretrained(tmp_path / "plain")
    bb.tokenizer.save_pretrained(tmp_path / "plain")
    results = ev(tmp_path / "plain", "gsm8k_synthetic", limit=1, gen_kwargs="max_gen_toks=4",
                 task_metadata=synthetic_metadata(tmp_path))
    assert results["config"]["pattern"] == "causal" and "gsm8k_synthetic" in results["results"]
    assert "used as a plain causal LM" in capsys.readouterr().err
