"""End-to-end Lightning runs on a tiny model: MLflow record, resume after a crash, HF export, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from safetensors.torch import load_file

from dlm.models.checkpoint import load_checkpoint, read_meta
from dlm.settings import ConfigError, load_config
from dlm.training.trainer import train
from tests.helpers import SMALL_MODEL, CrashAt, small_overrides  # noqa: F401 (re-exported for other test modules)

REPO = Path(__file__).resolve().parents[2]
def _run(tmp_path, config="experiments/tiny_ar.yaml", callbacks=(), **kw):
    return train(load_config(config, overrides=small_overrides(tmp_path, **kw)), callbacks=list(callbacks))


class StatusProbe(L.Callback):
    """Reads the run's MLflow status while training runs."""

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == 1:
            self.status = trainer.logger.experiment.get_run(trainer.logger.run_id).info.status


def _client(tmp_path):
    return mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ar")
    probe = StatusProbe()
    result = _run(tmp, callbacks=[probe])
    assert probe.status == "RUNNING"  # not FINISHED by the step-0 validation
    return tmp, result


def test_ar_run_logs_params_metrics_artifacts_and_exports(ar_run):
    tmp, result = ar_run
    run = _client(tmp).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["attention.pattern"] == "causal"
    assert run.data.params["final_checkpoint"] == str(result.final_dir.resolve())
    assert {"train/loss", "val/loss", "val/masked_acc", "train/device/items_per_sec"} <= set(run.data.metrics)
    assert [a.path for a in _client(tmp).list_artifacts(result.run_id)] == ["config.yaml"]
    val = _client(tmp).get_metric_history(result.run_id, "val/loss")
    assert val[0].step == 0 and len(val) >= 2  # the curve starts before the first optimizer step
    assert read_meta(result.final_dir).pattern == "causal"


def test_exported_checkpoint_matches_lightning_weights(ar_run):
    tmp, result = ar_run
    lightning_state = torch.load(tmp / "out/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    exported = load_file(result.final_dir / "model.safetensors")
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, lightning_state[f"model.{name}"])
    backbone, meta = load_checkpoint(result.final_dir)
    torch.testing.assert_close(backbone.model.model.embed_tokens.weight,
                               lightning_state["model.model.embed_tokens.weight"])


def test_conversion_from_ar_checkpoint_runs_block_clean(ar_run, tmp_path):
    _, ar = ar_run
    result = _run(tmp_path, "experiments/tiny.yaml", **{"model.name_or_path": str(ar.final_dir),
                                                       "trainer.export_every_n_steps": "3"})
    meta = read_meta(result.final_dir)
    assert (meta.pattern, meta.block_size, meta.shift) == ("block_clean", 4, False)
    assert result.metrics["val/loss"] > 0 and 0 <= result.metrics["val/masked_acc"] <= 1
    # trainer.export_every_n_steps: a folder per 3 steps beside final; the last is final's weights, the first not
    steps = tmp_path / "out/steps"
    assert sorted(p.name for p in steps.iterdir()) == ["step-000003", "step-000006"]
    assert read_meta(steps / "step-000003") == meta
    final = load_file(result.final_dir / "model.safetensors")
    assert load_file(steps / "step-000006/model.safetensors").keys() == final.keys()
    for name, tensor in load_file(steps / "step-000006/model.safetensors").items():
        torch.testing.assert_close(tensor, final[name], rtol=0, atol=0)
    assert not torch.equal(load_file(steps / "step-000003/model.safetensors")["model.embed_tokens.weight"],
                           final["model.embed_tokens.weight"])


def test_crash_marks_run_failed_and_resume_continues_same_run(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, callbacks=[CrashAt(4)])
    client = _client(tmp_path)
    (crashed,) = client.search_runs([client.get_experiment_by_name("dlm-tiny").experiment_id])
    assert crashed.info.status == "FAILED"
    assert not (tmp_path / "out/final").exists()
    with pytest.raises(ConfigError, match="set resume=true to continue"):
        _run(tmp_path)  # refuses to overwrite the crashed run's checkpoints
    resumed = _run(tmp_path, resume="true")
    assert resumed.run_id == crashed.info.run_id
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "train/loss")]
    # crashed in the batch after step 3 was logged (checkpoint at 3 steps); the resumed run redoes step 3 but
    # does not log it again (dlm.training.resume)
    assert sorted(steps) == [0, 1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "out/checkpoints/last.ckpt", weights_only=False)["global_step"] == 6


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.ids: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.ids[trainer.global_step] = batch.input_ids.clone()


def test_streaming_resume_continues_the_stream(tmp_path):
    stream = {"data.streaming": "true", "data.val_rows": "20", "data.shuffle_buffer": "1"}
    first = BatchRecorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, callbacks=[first, CrashAt(4)], **stream)
    ckpt = torch.load(tmp_path / "out/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the loader's position is saved
    resumed = BatchRecorder()
    _run(tmp_path, callbacks=[resumed], resume="true", **stream)
    assert min(resumed.ids) == 3  # checkpoint after 3 steps
    # The stream goes on exactly where the checkpoint was: Lightning had fetched one batch ahead when it saved
    # the loader's position, and the checkpoint holds the position before that batch instead.
    assert torch.equal(resumed.ids[3], first.ids[3]) and torch.equal(resumed.ids[4], first.ids[4])
    assert not torch.equal(resumed.ids[3], first.ids[0])


class FirstBatchPerEpoch(L.Callback):
    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.ids.append(batch.input_ids.clone())


def test_streaming_reshuffles_each_epoch_in_a_run(tmp_path):
    seen = FirstBatchPerEpoch()  # ~80 train rows: the stream runs out (an epoch) within 40 steps
    _run(tmp_path, callbacks=[seen], **{"data.streaming": "true", "data.synthetic_size": "100", "data.val_rows": "20",
                                        "data.shuffle_buffer": "100", "trainer.max_steps": "40"})
    assert len(seen.ids) >= 2 and not torch.equal(seen.ids[0], seen.ids[1])


def test_bad_data_path_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.path='./missing.jsonl': no such file or folder"):
        _run(tmp_path, **{"data.path": "./missing.jsonl"})
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_ddp_two_processes_on_cpu(tmp_path, streaming):
    args = small_overrides(tmp_path, **{"trainer.strategy": "ddp", "trainer.devices": "2", "trainer.max_steps": "4",
                                        "data.streaming": streaming, "data.val_rows": "20"})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dlm", "train", "experiments/tiny_ar.yaml", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final checkpoint:" in proc.stdout
    assert read_meta(tmp_path / "out/final").pattern == "causal"
    (run,) = _client(tmp_path).search_runs([_client(tmp_path).get_experiment_by_name("dlm-tiny").experiment_id])
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_lora_conversion_trains_resumes_exports_and_decodes(tmp_path, ar_checkpoint, export):
    lora = {"model.name_or_path": str(ar_checkpoint), "model.lora.enabled": "true", "model.lora.rank": "4",
            "model.lora.export": export}
    if export == "merged":  # one kill is enough: resume does not depend on the export form
        with pytest.raises(RuntimeError, match="simulated crash"):
            _run(tmp_path, "experiments/tiny.yaml", callbacks=[CrashAt(4)], **lora)
    resumed = _run(tmp_path, "experiments/tiny.yaml", resume=str(export == "merged").lower(), **lora)
    run = _client(tmp_path).get_run(resumed.run_id)
    trainable, total = int(run.data.params["model/trainable_params"]), int(run.data.params["model/total_params"])
    assert 0 < trainable < total / 5
    state = torch.load(tmp_path / "out/checkpoints/last.ckpt", weights_only=False)
    assert state["global_step"] == 6 and any("lora_A" in k for k in state["state_dict"])
    assert (resumed.final_dir / "adapter_config.json").is_file() == (export == "adapter")
    backbone, meta = load_checkpoint(resumed.final_dir)
    assert not any("lora_" in n for n, _ in backbone.model.named_parameters())
    from dlm.decoding.text import complete, decode_config_for

    out = complete(backbone, meta, ["Question: 2 + 3?\nAnswer:"], decode_config_for(meta, max_new_tokens=8))
    assert out.output.nfe > 0


class NoiseBlocks(L.Callback):
    """The block size each step's noise was drawn with: (B, blocks) of the masked counts."""

    def __init__(self) -> None:
        self.blocks: dict[int, int] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.blocks[trainer.global_step] = 32 // batch.num_masked.shape[1]


def test_block_size_schedule_is_logged_per_step_and_resumes_in_its_stage(tmp_path, ar_checkpoint):
    stages = {"model.name_or_path": str(ar_checkpoint), "attention.block_size_schedule": "[[0,2],[3,4],[5,8]]"}
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, "experiments/tiny.yaml", callbacks=[CrashAt(4)], **stages)
    noise = NoiseBlocks()
    resumed = _run(tmp_path, "experiments/tiny.yaml", callbacks=[noise], resume="true", **stages)
    history = _client(tmp_path).get_metric_history(resumed.run_id, "train/block_size")
    assert sorted((m.step, m.value) for m in history) == [(0, 2), (1, 2), (2, 2), (3, 4), (4, 4), (5, 8)]  # once each
    assert noise.blocks == {3: 4, 4: 4, 5: 8}  # the resumed run noises in the restored stage
    assert read_meta(resumed.final_dir).block_size == 8


def test_tracking_off_writes_metrics_csv_and_no_mlflow_store(tmp_path):
    from dlm.experiments.train_bench import last_metrics

    result = _run(tmp_path, **{"tracking.enabled": "false"})
    assert result.run_id == "" and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "out" / "mlflow_run.json").exists()
    metrics = last_metrics(tmp_path / "out" / "metrics" / "metrics.csv")
    assert {"train/loss", "val/loss", "train/device/items_per_sec"} <= set(metrics)
    assert (tmp_path / "out" / "config.yaml").is_file() and read_meta(result.final_dir).pattern == "causal"


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")


@pytest.fixture(scope="module")
def plain_chat_model(tmp_path_factory, ar_checkpoint) -> Path:
    """The tiny AR model as a plain HF folder (no dlm.yaml) whose tokenizer has a chat template: an instruct
    model as a user brings it."""
    out = tmp_path_factory.mktemp("plain") / "instruct"
    backbone, _ = load_checkpoint(ar_checkpoint)
    backbone.tokenizer.chat_template = CHAT_TEMPLATE
    backbone.model.save_pretrained(out)
    backbone.tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_chat_conversion_of_a_plain_folder_in_bf16_records_its_template(tmp_path, plain_chat_model, precision):
    result = _run(tmp_path, "experiments/tiny.yaml", **{
        "model.name_or_path": str(plain_chat_model), "data.chat_template": "true", "data.system_prompt": "Be brief.",
        "trainer.precision": precision, "data.max_length": "64"})
    assert torch.isfinite(torch.tensor(result.metrics["val/loss"]))
    meta = read_meta(result.final_dir)
    assert (meta.pattern, meta.chat_template, meta.system_prompt) == ("block_clean", CHAT_TEMPLATE, "Be brief.")
    assert meta.base_model == str(plain_chat_model.resolve())
    from dlm.decoding.text import chat_format_for, complete, decode_config_for

    backbone, meta = load_checkpoint(result.final_dir, dtype="bfloat16")
    chat = chat_format_for(meta, backbone.tokenizer)
    eos = backbone.tokenizer.eos_token
    assert chat.prompt(backbone.tokenizer, "2 + 3?") == f"<system>Be brief.{eos}<user>2 + 3?{eos}<assistant>"
    out = complete(backbone, meta, ["2 + 3?"], decode_config_for(meta, max_new_tokens=8), chat=chat)
    assert out.output.nfe > 0 and backbone.model.dtype == torch.bfloat16
