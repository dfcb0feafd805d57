"""LmEvalCallback in a real tiny conversion run: eval metrics in the MLflow record, failures survived."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch

from dlm.settings import ConfigError, EvalConfig, load_config
from dlm.training.callbacks.lm_eval import LmEvalCallback
from dlm.training.module import DiffusionLM
from dlm.training.trainer import train
from tests.conftest import one_torch_thread
from tests.training.test_trainer import small_overrides

METRIC = "eval/gsm8k_synthetic/exact_match_strict-match"


def tiny_dlm(tmp_path):
    """The 6-step block_clean conversion config, from scratch (no AR checkpoint on disk)."""
    return load_config("experiments/tiny.yaml", overrides=small_overrides(
        tmp_path, **{"model.name_or_path": "null", "model.tokenizer": "builtin:tiny"}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Evaluation every 3 steps, and a second callback whose every evaluation fails (a bad gen kwarg)."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    good = LmEvalCallback(EvalConfig(limit=2, batch_size=2, gen_kwargs="max_gen_toks=8", log_samples=True), 3)
    failing = LmEvalCallback(EvalConfig(limit=1, gen_kwargs="top_k=5"), 4)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("dlm.training.callbacks.lm_eval").addHandler(handler)
    try:
        with one_torch_thread():
            result = train(tiny_dlm(tmp), callbacks=[good, failing])
    finally:
        logging.getLogger("dlm.training.callbacks.lm_eval").removeHandler(handler)
    return mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db"), result, records


def test_eval_metrics_are_logged_into_the_training_run_at_every_nth_step(run):
    client, result, _ = run
    record = client.get_run(result.run_id)
    assert record.info.status == "FINISHED" and record.data.params["attention.pattern"] == "block_clean"
    for key in (METRIC, "eval/gsm8k_synthetic/exact_match_flexible-extract", "eval/tokens_per_forward"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [3, 6], key  # 6 is also train end: evaluated once
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(result.run_id, METRIC))


def test_each_evaluation_logs_its_results_json_with_samples_as_an_artifact(run):
    client, result, _ = run
    logged = sorted(a.path for a in client.list_artifacts(result.run_id, "lm_eval"))
    assert logged == ["lm_eval/results_step000003.json", "lm_eval/results_step000006.json"]
    local = client.download_artifacts(result.run_id, logged[0])
    saved = json.loads(Path(local).read_text())
    assert {s["doc_id"] for s in saved["samples"]["gsm8k_synthetic"]} == {0, 1}  # limit=2 (a row per filter)
    assert saved["results"]["gsm8k_synthetic"]


def test_a_failing_evaluation_is_logged_and_training_goes_on(run):
    client, result, records = run
    failures = [r for r in records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [f"LmEvalCallback: evaluation at step {s} failed; training continues"
                                                  for s in (4, 6)]
    assert "gen_kwargs.top_k=5: not supported" in str(failures[0].exc_info[1])
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_evaluation_restores_train_mode_kernel_and_random_streams(tmp_path):
    cfg = tiny_dlm(tmp_path)
    module = DiffusionLM(cfg).train()
    module.model.set_attn_implementation("flex_attention")  # as trained on CUDA; eval needs a dense-mask kernel
    callback = LmEvalCallback(EvalConfig(limit=1, gen_kwargs="max_gen_toks=4"), 1)
    callback.setup(L.Trainer(logger=False, accelerator="cpu", devices=1, default_root_dir=tmp_path), module, "fit")
    torch.manual_seed(7)
    random.seed(7)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    metrics = callback.evaluate(module)["dlm_metrics"]
    assert set(metrics) >= {METRIC, "eval/gsm8k_synthetic/exact_match_flexible-extract"}
    assert module.training and module.model.training
    assert module.model.config._attn_implementation == "flex_attention"
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_bad_settings_fail_at_setup_before_the_first_step(tmp_path):
    with pytest.raises(ConfigError, match=r"^every_n_steps=0: must be a positive integer"):
        LmEvalCallback(EvalConfig(), 0)
    trainer = L.Trainer(logger=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^data_dir='.*missing': no such folder"):
        LmEvalCallback(EvalConfig(tasks=["gsm8k"], data_dir=str(tmp_path / "missing")),
                       1).setup(trainer, L.LightningModule(), "fit")
    with pytest.raises(ConfigError, match=r"^tasks=\[''\]: no task given"):
        LmEvalCallback(EvalConfig(tasks=[""]), 1).setup(trainer, L.LightningModule(), "fit")
