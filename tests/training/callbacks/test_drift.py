"""WeightDriftCallback in a real tiny conversion run, resumed after a crash: drift/* metrics and the plot in
the MLflow record, measured from the AR weights (not the resumed ones), and broken references survived."""

from __future__ import annotations

import warnings

import mlflow
import pytest

from dlm.cli.main import build_parser
from dlm.measurement.drift import load_weights, weight_drift
from dlm.models.checkpoint import CheckpointMeta, save_checkpoint
from dlm.settings import ConfigError, load_config
from dlm.training.callbacks.drift import WeightDriftCallback
from dlm.training.trainer import train
from tests.conftest import make_backbone
from tests.training.test_trainer import CrashAt, small_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """Convert a tiny AR Qwen3 (block_clean); crash at step 2, resume to step 4 with a working drift callback
    (every step), one whose reference folder is missing and one whose reference is a Llama."""
    tmp = tmp_path_factory.mktemp("drift_run")
    ar = make_backbone("qwen3", tokenizer)
    save_checkpoint(ar.model, ar.tokenizer, CheckpointMeta("causal", 4, ar.tokenizer.mask_token, ar.mask_token_id),
                    tmp / "ar")
    make_backbone("llama", tokenizer).model.save_pretrained(tmp / "llama")
    overrides = small_overrides(tmp, **{"model.name_or_path": str(tmp / "ar"), "trainer.max_steps": "4",
                                        "trainer.checkpoint_every_n_steps": "2", "trainer.val_every_n_steps": "2",
                                        "trainer.limit_val_batches": "1"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config("experiments/tiny.yaml", overrides=overrides), callbacks=[CrashAt(2)])
    callbacks = [WeightDriftCallback(every_n_steps=1), WeightDriftCallback(reference=tmp / "missing"),
                 WeightDriftCallback(reference=tmp / "llama")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(load_config("experiments/tiny.yaml", overrides=[*overrides, "resume=true"]), callbacks=callbacks)
    return tmp, mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db"), result, [str(w.message) for w in caught]


def test_drift_metrics_and_plot_are_in_the_run_record(run):
    tmp, client, result, _ = run
    record = client.get_run(result.run_id)
    assert record.info.status == "FINISHED"
    assert {"drift/layer_00/attention", "drift/layer_00/mlp", "drift/layer_01/attention", "drift/layer_01/mlp",
            "drift/attention_mean", "drift/mlp_mean"} <= set(record.data.metrics)
    history = client.get_metric_history(result.run_id, "drift/layer_01/attention")
    assert sorted(m.step for m in history) == [3, 4]  # every step after the resume at 2; train end adds no repeat
    assert all(m.value > 0 for m in history)
    assert sorted(a.path for a in client.list_artifacts(result.run_id)) == ["config.yaml", "weight_drift.png"]
    assert (tmp / "out" / "weight_drift.png").read_bytes().startswith(b"\x89PNG")


def test_drift_is_measured_from_the_ar_weights_even_after_a_resume(run):
    tmp, client, result, _ = run
    expected = weight_drift(load_weights(result.final_dir), load_weights(tmp / "ar")).as_metrics()
    logged = client.get_run(result.run_id).data.metrics
    assert {k: logged[k] for k in expected} == pytest.approx(expected, rel=1e-6)


def test_cli_on_the_exported_checkpoint_agrees_with_the_callback(run):
    tmp, client, result, _ = run
    parser = build_parser()
    run_drift = lambda args: args.func(args)  # noqa: E731
    run_drift(parser.parse_args(["drift", str(result.final_dir), "--reference", str(tmp / "ar"),
                                 "--mlflow-run", result.run_id, "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
                                 "--step", "99"]))
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, "drift/attention_mean")}
    assert history[99] == pytest.approx(history[4], rel=1e-6)
    with pytest.raises(ConfigError, match=r"^mlflow_run='nope': no such run in tracking URI sqlite:///"):
        run_drift(parser.parse_args(["drift", str(result.final_dir), "--reference", str(tmp / "ar"),
                                     "--mlflow-run", "nope", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]))


def test_broken_references_warn_once_and_training_finishes(run):
    _, _, result, messages = run
    drift = [m for m in messages if m.startswith("WeightDriftCallback")]
    assert len(drift) == 2, drift
    assert "reading the reference weights failed" in drift[0] and "/missing': no such folder" in drift[0]
    assert ("computing drift at step 4 failed" in drift[1]
            and "self_attn.k_norm.weight': missing from the reference" in drift[1])
    assert result.final_dir.is_dir()


def test_negative_interval_is_rejected():
    with pytest.raises(ConfigError, match=r"^drift.every_n_steps=-1: must be an integer >= 0"):
        WeightDriftCallback(every_n_steps=-1)
