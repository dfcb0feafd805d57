"""ThroughputCallback in a real tiny conversion run: bench metrics in the MLflow record, failures survived."""

from __future__ import annotations

import warnings

import mlflow
import pytest

from dlm.settings import ConfigError, load_config
from dlm.training.callbacks.throughput import ThroughputCallback, decoding_mode
from dlm.training.trainer import train
from tests.conftest import make_backbone, one_torch_thread
from tests.training.test_trainer import small_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step block_clean run from scratch with a working bench every 4 steps and one that always fails."""
    tmp = tmp_path_factory.mktemp("throughput")
    overrides = small_overrides(tmp, **{"model.name_or_path": "null", "model.tokenizer": "builtin:tiny"})
    good = ThroughputCallback(4, num_prompts=2, max_new_tokens=8, batch_size=2, threshold=0.5)
    failing = ThroughputCallback(3, num_prompts=1, max_new_tokens=10**6, batch_size=1)
    with one_torch_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(load_config("experiments/tiny.yaml", overrides=overrides), callbacks=[good, failing])
    return mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db"), result, [str(w.message) for w in caught]


def test_bench_metrics_are_logged_at_every_nth_step_into_the_training_run(run):
    client, result, _ = run
    assert client.get_run(result.run_id).data.params["attention.pattern"] == "block_clean"
    for key in ("bench/tokens_per_sec", "bench/tpf", "bench/nfe", "bench/exact_match"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [4, 6], key  # 6: at train end
    tpf = [m.value for m in client.get_metric_history(result.run_id, "bench/tpf")]
    assert all(0 < v <= 4 for v in tpf)  # a pass decodes inside one block of 4


def test_a_failing_bench_warns_and_training_goes_on(run):
    client, result, messages = run
    failures = [m for m in messages if m.startswith("ThroughputCallback: bench at step")]
    assert len(failures) == 2 and "exceeds max_position_embeddings" in failures[0]  # steps 3 and 6 (= train end: once)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss")) == list(range(6))
    assert (result.final_dir / "dlm.yaml").is_file()


def test_decoding_mode_switches_flex_to_sdpa_and_restores_training_state(tokenizer):
    model = make_backbone("qwen3", tokenizer).model.train()
    model.set_attn_implementation("flex_attention")
    with decoding_mode(model):
        assert (model.training, model.config._attn_implementation) == (False, "sdpa")
    assert (model.training, model.config._attn_implementation) == (True, "flex_attention")
    with pytest.raises(RuntimeError, match="boom"), decoding_mode(model.eval()):
        raise RuntimeError("boom")
    assert (model.training, model.config._attn_implementation) == (False, "flex_attention")


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, r"^throughput.every_n_steps=0: must be a positive integer"),
    ({"every_n_steps": 5, "threshold": 1.5}, r"^throughput.threshold=1.5: must be in \(0, 1\]"),
    ({"every_n_steps": 5, "block_size": 0}, r"^throughput.block_size=0: must be a positive integer"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ThroughputCallback(**kwargs)
