"""Checks before `dlm train` loads anything: Lightning's own registries decide accelerator and strategy, the
resume checkpoint is opened with weights_only=True (a planted pickle payload does not run), the raw data has
rows and columns. The same pickle payload in `pytorch_model.bin` is refused by the model loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlm.models.backbone import load_backbone
from dlm.settings import ConfigError, DataConfig, ModelConfig, load_config
from dlm.training.preflight import check_model_source, check_raw_data, check_trainer, read_resume_checkpoint
from dlm.training.trainer import train
from tests.helpers import save_tiny_ar, small_overrides

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates `marker`: the file appearing means the checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cfg(tmp_path, **kw):
    return load_config(REPO / "experiments/tiny_ar.yaml", overrides=small_overrides(tmp_path, **kw))


def test_the_payload_is_real_it_runs_under_a_pickle_load(tmp_path):
    torch.save({"payload": Payload(tmp_path / "ran")}, tmp_path / "evil.ckpt")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert (tmp_path / "ran").exists()  # so its absence below means the loaders refused it


def test_resume_from_a_planted_last_ckpt_refuses_and_runs_nothing(tmp_path):
    (tmp_path / "out/checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 3, "payload": Payload(tmp_path / "ran")},
               tmp_path / "out/checkpoints/last.ckpt")
    with pytest.raises(ConfigError, match=r"last\.ckpt' refused: it holds pickled objects.*Unsupported global"):
        train(_cfg(tmp_path, resume="true"))
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]  # no run file, no lock


def test_a_planted_pytorch_model_bin_is_refused_by_the_model_loader(tmp_path):
    folder = save_tiny_ar(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload(tmp_path / "ran")},
               folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin refused: it holds pickled objects"):
        load_backbone(ModelConfig(name_or_path=str(folder)))
    assert not (tmp_path / "ran").exists()


def test_a_real_lightning_checkpoint_opens_with_weights_only(tmp_path):
    result = train(_cfg(tmp_path, **{"trainer.max_steps": "3"}))
    state = read_resume_checkpoint(tmp_path / "out/checkpoints/last.ckpt")
    assert state["global_step"] == 3 and result.final_dir.is_dir()


def test_truncated_resume_checkpoint_fails_in_one_line(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"is corrupt or truncated"):
        read_resume_checkpoint(path)


@pytest.mark.parametrize("key, value, match", [
    ("trainer.accelerator", "tpu", r"trainer.accelerator='tpu': not available on this machine; allowed: auto, cpu"),
    ("trainer.accelerator", "quantum", r"trainer.accelerator='quantum': unknown accelerator"),
    ("trainer.strategy", "bogus", r"trainer.strategy='bogus': unknown strategy"),
])
def test_trainer_names_are_checked_against_lightning_registries(tmp_path, key, value, match):
    if value == "tpu" and torch.cuda.is_available():
        match = match.replace("auto, cpu", "auto, cpu, cuda")
    with pytest.raises(ConfigError, match=match):
        check_trainer(_cfg(tmp_path, **{key: value}))


def test_trainer_names_lightning_knows_pass(tmp_path):
    check_trainer(_cfg(tmp_path, **{"trainer.strategy": "ddp", "trainer.accelerator": "cpu"}))


def test_missing_local_model_folder_fails_before_the_data_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path='\./nowhere': no such folder"):
        check_model_source(ModelConfig(name_or_path="./nowhere"))


@pytest.mark.parametrize("content, match", [
    ("", r"no rows in split 'train' \(empty file\)"),
    ("{not json", r"cannot load split 'train' \(JSON parse error"),
    (json.dumps({"text": "one"}) + "\n", r"1 row\(s\) in split 'train'; need at least 2"),
    (json.dumps({"body": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n",
     r"data.text_field='text': no such column; allowed: body"),
])
def test_raw_data_problems_fail_in_one_line(tmp_path, content, match):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        check_raw_data(DataConfig(path=str(path)))
