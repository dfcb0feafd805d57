"""HFExportCallback and StepExportCallback alone on a bare Lightning Trainer (no dlm `train()`, no MLflow, no
ModelCheckpoint).

tests/training/test_trainer.py covers the export inside `train()` (causal and block_clean metadata, the MLflow
param, weights equal to last.ckpt); here: a non-default pattern/block size/shift, tied embeddings, every logger,
and that nothing is written before training ends.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.testing import assert_close

from dlm.data.datamodule import DiffusionDataModule
from dlm.models.checkpoint import CheckpointMeta, load_checkpoint, read_meta
from dlm.settings import load_config
from dlm.training.callbacks.export import HFExportCallback, StepExportCallback
from dlm.training.module import DiffusionLM
from tests.helpers import small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 3


class FinalDirProbe(L.Callback):
    """Whether the export folder existed at each training step."""

    def __init__(self, final) -> None:
        self.final, self.seen = final, []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.seen.append(self.final.exists())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    overrides = small_overrides(tmp, **{"model.name_or_path": "null", "model.tokenizer": "builtin:tiny",
                                        "name": "export-probe", "attention.pattern": "block",
                                        "attention.block_size": "8", "objective.shift": "true",
                                        "optim.warmup_steps": "0", "trainer.max_steps": str(STEPS)})
    cfg = load_config("experiments/tiny.yaml", overrides=overrides)
    torch.manual_seed(0)
    module = DiffusionLM(cfg)
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    data = DiffusionDataModule(cfg, module.tokenizer, module.mask_token_id)
    final = tmp / "out/final"
    loggers = [CSVLogger(tmp / "csv_a"), CSVLogger(tmp / "csv_b")]
    probe = FinalDirProbe(final)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=loggers,
                        callbacks=[HFExportCallback(final), probe], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    return cfg, module, initial, final, loggers, probe


def test_export_is_written_only_when_training_ends(run):
    *_, final, _, probe = run
    assert probe.seen == [False] * STEPS
    assert (final / "model.safetensors").is_file()
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]  # no .partial or .prev left


def test_dlm_yaml_matches_the_config(run):
    cfg, module, *_, final, _, _ = run
    meta = read_meta(final)
    assert meta == CheckpointMeta("block", 8, "<|mask|>", module.mask_token_id, shift=True,
                                  source_experiment="export-probe")
    assert (meta.pattern, meta.block_size, meta.shift) == (cfg.attention.pattern, cfg.attention.block_size,
                                                           cfg.objective.shift)


def test_loaded_checkpoint_has_the_trained_weights(run):
    _, module, initial, final, _, _ = run
    backbone, _ = load_checkpoint(final)
    trained = {k.removeprefix("model."): v for k, v in module.state_dict().items()}
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(trained)
    for name, tensor in loaded.items():
        assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    changed = [k for k, v in initial.items() if not torch.equal(v, module.state_dict()[k])]
    assert "model.model.embed_tokens.weight" in changed  # the export is of trained, not initial, weights
    assert backbone.mask_token_id == module.mask_token_id


def test_tied_embeddings_stay_tied_after_export(run):
    cfg, _, _, final, _, _ = run
    assert cfg.model.config["tie_word_embeddings"] is True  # tiny_ar.yaml, inherited by tiny.yaml
    model = load_checkpoint(final)[0].model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_final_checkpoint_is_logged_to_every_logger(run):
    *_, final, loggers, _ = run
    for logger in loggers:
        hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
        assert hparams["final_checkpoint"] == str(final.resolve())


class WeightsProbe(L.Callback):
    """The backbone's weights after each optimizer step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.at[trainer.global_step] = {k.removeprefix("model."): v.detach().clone()
                                        for k, v in pl_module.state_dict().items()}


def test_step_exports_hold_the_weights_of_their_step_under_accumulation(tmp_path):
    overrides = small_overrides(tmp_path, **{"model.name_or_path": "null", "model.tokenizer": "builtin:tiny",
                                             "optim.warmup_steps": "0", "trainer.max_steps": "4"})
    cfg = load_config("experiments/tiny.yaml", overrides=overrides)
    torch.manual_seed(0)
    module = DiffusionLM(cfg)
    data = DiffusionDataModule(cfg, module.tokenizer, module.mask_token_id)
    probe, steps = WeightsProbe(), tmp_path / "out/steps"
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, accumulate_grad_batches=2,
                        callbacks=[StepExportCallback(steps, every=2), probe], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert sorted(p.name for p in steps.iterdir()) == ["step-000002", "step-000004"]
    assert not torch.equal(probe.at[2]["model.embed_tokens.weight"], probe.at[4]["model.embed_tokens.weight"])
    for step in (2, 4):
        loaded = load_checkpoint(steps / f"step-{step:06d}")[0].model.state_dict()
        for name, tensor in loaded.items():
            assert_close(tensor, probe.at[step][name], rtol=0, atol=0, msg=f"step {step}: {name}")
