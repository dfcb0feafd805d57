"""Exact resume: a tiny diffusion run (dropout on, validation off the checkpoint grid) killed with SIGKILL
mid-epoch between checkpoints and resumed reproduces the uninterrupted run's train losses and final weights
exactly on CPU, and logs no step twice; a kill during the final export is repaired by the resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from dlm.models.checkpoint import read_meta
from dlm.settings import load_config
from dlm.tracking.lock import LOCK_FILE
from dlm.training.resume import RESUMED_TAG, ResumedMLFlowLogger
from dlm.training.trainer import train
from tests.helpers import small_overrides

REPO = Path(__file__).resolve().parents[2]
RUN = {"model.name_or_path": "null", "model.tokenizer": "builtin:tiny", "model.config.attention_dropout": "0.2",
       "trainer.max_steps": "12", "trainer.checkpoint_every_n_steps": "4", "trainer.val_every_n_steps": "5",
       "masking.strategy": "position"}


def _overrides(tmp_path: Path, **kw: str) -> list[str]:
    return small_overrides(tmp_path, **(RUN | kw))


def _train_in_subprocess(tmp_path: Path, body: str, **kw: str) -> subprocess.CompletedProcess:
    """`train(...)` in a child process that `body` (Python run first) arranges to SIGKILL itself."""
    cfg = f"load_config({str(REPO / 'experiments/tiny.yaml')!r}, overrides={_overrides(tmp_path, **kw)!r})"
    code = "\n".join(["import os, signal", "import lightning as L", "from dlm.settings import load_config",
                      "from dlm.training.trainer import train", textwrap.dedent(body),
                      f"train({cfg}, callbacks=CALLBACKS)"])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(REPO)})


KILL_AT_STEP_10 = """
    class KillAt(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 10:  # after the checkpoint at 8, before the one at 12
                os.kill(os.getpid(), signal.SIGKILL)
    CALLBACKS = [KillAt()]
"""


def _history(tmp_path: Path, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    result = train(load_config(REPO / "experiments/tiny.yaml", overrides=_overrides(tmp)))
    return tmp, result


def test_sigkill_between_checkpoints_then_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    whole_dir, whole = uninterrupted
    killed = _train_in_subprocess(tmp_path, KILL_AT_STEP_10)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "out/checkpoints/last.ckpt").is_file() and not (tmp_path / "out/final").exists()
    assert (tmp_path / "out" / LOCK_FILE).is_file()  # left by the kill: stale, taken over below
    resumed = train(load_config(REPO / "experiments/tiny.yaml", overrides=_overrides(tmp_path, resume="true")))
    assert resumed.run_id == read_run_id(tmp_path)
    whole_losses, resumed_losses = _history(whole_dir, whole.run_id), _history(tmp_path, resumed.run_id)
    assert [s for s, _ in resumed_losses] == list(range(12))  # every step once: the re-run 8..9 not logged twice
    assert resumed_losses == whole_losses  # exactly, not approximately
    assert _history(tmp_path, resumed.run_id, "val/loss") == _history(whole_dir, whole.run_id, "val/loss")
    a, b = load_file(whole.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RESUMED_TAG] == "from step 8 (steps 8..9 re-run, not logged again)"
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def read_run_id(tmp_path: Path) -> str:
    from dlm.tracking.runs import read_run_file

    return read_run_file(tmp_path / "out")["run_id"]


KILL_DURING_EXPORT = """
    import transformers
    save = transformers.PreTrainedModel.save_pretrained
    def save_then_die(self, path, *args, **kwargs):  # the weights are in final.partial, the rest never comes
        save(self, path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    transformers.PreTrainedModel.save_pretrained = save_then_die
    CALLBACKS = []
"""


def test_sigkill_during_the_final_export_is_repaired_by_resume(uninterrupted, tmp_path, capsys):
    whole_dir, whole = uninterrupted
    killed = _train_in_subprocess(tmp_path, KILL_DURING_EXPORT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "final.partial").is_dir() and not (out / "final").exists()
    assert torch.load(out / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 12  # training was done
    from dlm.cli.main import main

    assert main(["train", str(REPO / "experiments/tiny.yaml"), *_overrides(tmp_path, resume="true")]) == 0
    printed = capsys.readouterr().out
    assert f"final checkpoint: {out / 'final'}" in printed
    assert read_meta(out / "final").pattern == "block_clean" and not (out / "final.partial").exists()
    a, b = load_file(whole.final_dir / "model.safetensors"), load_file(out / "final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(read_run_id(tmp_path))
    assert run.info.status == "FINISHED" and run.data.params["final_checkpoint"] == str((out / "final").resolve())


def test_resumed_logger_drops_only_steps_the_run_already_holds(tmp_path):
    logger = ResumedMLFlowLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                                 logged_until={"train/loss": 5})
    logger.log_metrics({"train/loss": 1.0, "val/loss": 2.0}, step=5)
    logger.log_metrics({"train/loss": 3.0}, step=6)
    assert _history_at(tmp_path, logger.run_id, "train/loss") == [(6, 3.0)]
    assert _history_at(tmp_path, logger.run_id, "val/loss") == [(5, 2.0)]


def _history_at(tmp_path: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
