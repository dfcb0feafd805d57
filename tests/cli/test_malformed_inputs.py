"""The real `dlm` CLI over malformed inputs: each one exits 2 with exactly one `error:` line, no traceback, and
nothing created or changed in the workspace (output folders, the MLflow store, the inputs themselves).

Every case runs in-process through `main([...])`: the checks under test come before any model load, MLflow run
or compute, so a case costs milliseconds once the libraries are imported. A case that slipped past its check
would train, decode or evaluate, and fail the snapshot comparison (or take long enough to notice).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dlm.cli.main import main
from dlm.data.synthetic import synthetic_dir
from dlm.models.checkpoint import META_FILE
from dlm.settings import DataConfig
from tests.helpers import save_tiny_ar, small_overrides

REPO = Path(__file__).resolve().parents[2]
TINY_AR = str(REPO / "experiments" / "tiny_ar.yaml")


class Payload:
    """Unpickling this runs `Path.touch(marker)`: proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {}, "payload": Payload(marker)}, path)


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _ckpt_variant(ws: Path, name: str, good: Path) -> Path:
    out = ws / "ckpts" / name
    shutil.copytree(good, out)
    return out


def _meta(good: Path) -> dict:
    return yaml.safe_load((good / META_FILE).read_text())


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace every case runs in: inputs only; no output folder and no MLflow store exist."""
    ws = tmp_path_factory.mktemp("malformed")
    good = save_tiny_ar(ws / "ckpts" / "good")
    synthetic_dir(DataConfig(cache_dir=str(ws / "data"), synthetic_size=400))  # what small_overrides trains on
    _write(ws / "yaml/broken.yaml", "name: x\nmodel: {arch: qwen3\ntrainer:\n  max_steps: 3\n")
    _write(ws / "yaml/python_tag.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    _write(ws / "yaml/list.yaml", "- name: x\n- seed: 1\n")
    _write(ws / "yaml/scalar.yaml", "just a string\n")
    _write(ws / "yaml/self_base.yaml", "base: self_base.yaml\nname: x\n")
    _write(ws / "yaml/cycle_a.yaml", "base: cycle_b.yaml\nname: a\n")
    _write(ws / "yaml/cycle_b.yaml", "base: cycle_a.yaml\nname: b\n")
    _write(ws / "yaml/missing_base.yaml", "base: nowhere.yaml\nname: x\n")
    _write(ws / "yaml/base_list.yaml", "base: [a.yaml]\nname: x\n")
    _write(ws / "data/empty.jsonl", "")
    _write(ws / "data/garbage.json", "{this is not json at all\n\x00\x01")
    _write(ws / "data/one_row.jsonl", json.dumps({"text": "only one row here"}) + "\n")
    rows = [{"body": f"row {i} " * 8} for i in range(20)]
    _write(ws / "data/no_text.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    short = [{"text": f"hi {i}"} for i in range(6)]
    _write(ws / "data/short.jsonl", "".join(json.dumps(r) + "\n" for r in short))
    _write(ws / "data/garbage.parquet", "not a parquet file")
    # checkpoint variants
    for name, change in {"bad_pattern": {"pattern": "bogus"}, "bad_block": {"block_size": "four"},
                         "zero_block": {"block_size": 0}, "bad_id": {"mask_token_id": -1},
                         "str_id": {"mask_token_id": "five"}, "bad_shift": {"shift": "maybe"},
                         "bad_token": {"mask_token": 3}, "extra_key": {"colour": "red"}}.items():
        path = _ckpt_variant(ws, name, good)
        (path / META_FILE).write_text(yaml.safe_dump(_meta(good) | change))
    path = _ckpt_variant(ws, "missing_key", good)
    (path / META_FILE).write_text(yaml.safe_dump({k: v for k, v in _meta(good).items() if k != "pattern"}))
    _write(_ckpt_variant(ws, "meta_yaml", good) / META_FILE, "pattern: [causal\n")
    _write(_ckpt_variant(ws, "meta_list", good) / META_FILE, "- causal\n- 4\n")
    _write(_ckpt_variant(ws, "meta_tag", good) / META_FILE, "pattern: !!python/name:os.system\n")
    no_meta = _ckpt_variant(ws, "no_meta", good)  # neither a dlm checkpoint nor a plain HF folder
    (no_meta / META_FILE).unlink()
    (no_meta / "config.json").unlink()
    truncated = _ckpt_variant(ws, "truncated", good)  # a diffusion checkpoint: bench refuses AR ones first
    (truncated / META_FILE).write_text(yaml.safe_dump(_meta(good) | {"pattern": "block_clean"}))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _write(_ckpt_variant(ws, "bad_tokenizer", good) / "tokenizer.json", "{\"version\": \"1.0\", \"model\": ")
    pickled = _ckpt_variant(ws, "pickled_bin", good)
    (pickled / "model.safetensors").unlink()
    plant_pickle(pickled / "pytorch_model.bin", ws / "PWNED")
    # training output folders to resume from
    for name in ("resume_corrupt", "resume_pickle", "resume_truncated"):
        (ws / name / "checkpoints").mkdir(parents=True)
    _write(ws / "resume_corrupt/checkpoints/last.ckpt", "garbage, not a checkpoint")
    plant_pickle(ws / "resume_pickle/checkpoints/last.ckpt", ws / "PWNED")
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ws / "resume_truncated/checkpoints/last.ckpt")
    ckpt = ws / "resume_truncated/checkpoints/last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    (ws / "earlier_run/checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, ws / "earlier_run/checkpoints/last.ckpt")
    # prompts and sweeps
    _write(ws / "prompts/empty.txt", "\n\n   \n")
    sweep = {"name": "s", "experiment": TINY_AR, "grid": {"attention.block_size": [4]}, "output_dir": str(ws / "sw"),
             "tracking": {"uri": f"sqlite:///{ws}/mlflow.db"}, "eval": {"enabled": False},
             "bench": {"enabled": False}}
    _write(ws / "sweeps/good.yaml", yaml.safe_dump(sweep))
    _write(ws / "sweeps/broken.yaml", "name: s\ngrid: {a: [1, 2}\n")
    _write(ws / "sweeps/list.yaml", "- name: s\n")
    _write(ws / "sweeps/unknown_key.yaml", yaml.safe_dump(sweep | {"gird": {}}))
    _write(ws / "sweeps/bad_point.yaml", yaml.safe_dump(sweep | {"grid": {"attention.pattern": ["blok"]}}))
    _write(ws / "sweeps/bad_value.yaml", yaml.safe_dump(sweep | {"grid": {"trainer.devices": [0]}}))
    _write(ws / "sweeps/tpu.yaml", yaml.safe_dump(sweep | {"overrides": ["trainer.accelerator=tpu"]}))
    _write(ws / "sweeps/no_experiment.yaml", yaml.safe_dump(sweep | {"experiment": "nowhere.yaml"}))
    _write(ws / "sweeps/python_tag.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    return ws


def _train(*extra: str) -> list[str]:
    return ["train", TINY_AR, *extra]


def _gen(ckpt: str = "good", *extra: str) -> list[str]:
    return ["generate", f"{{ws}}/ckpts/{ckpt}", "--prompt", "Question: 1+1?", "--max-new-tokens", "4", *extra]


CASES: dict[str, list[str]] = {
    # -- experiment YAML files
    "yaml syntax error": ["train", "{ws}/yaml/broken.yaml"],
    "yaml python tag": ["train", "{ws}/yaml/python_tag.yaml"],
    "yaml top-level list": ["train", "{ws}/yaml/list.yaml"],
    "yaml top-level scalar": ["train", "{ws}/yaml/scalar.yaml"],
    "base names itself": ["train", "{ws}/yaml/self_base.yaml"],
    "base cycle": ["train", "{ws}/yaml/cycle_a.yaml"],
    "base missing": ["train", "{ws}/yaml/missing_base.yaml"],
    "base not a string": ["train", "{ws}/yaml/base_list.yaml"],
    "config file missing": ["train", "{ws}/yaml/nowhere.yaml"],
    "config: yaml syntax error": ["config", "{ws}/yaml/broken.yaml"],
    "config: base cycle": ["config", "{ws}/yaml/cycle_b.yaml"],
    "config: unknown key": ["config", TINY_AR, "attention.patern=block"],
    # -- experiment keys and values
    "unknown key": _train("attention.patern=block"),
    "unknown section": _train("atention.pattern=block"),
    "wrong type": _train("data.batch_size=abc"),
    "wrong type max_length": _train("data.max_length=long"),
    "unknown pattern": _train("attention.pattern=blok"),
    "unknown backend": _train("attention.backend=cuda"),
    "unknown dtype": _train("model.dtype=float8"),
    "unknown precision": _train("trainer.precision=8"),
    "block does not divide": _train("attention.block_size=5"),
    "block zero": _train("attention.block_size=0"),
    "max_length zero": _train("data.max_length=0"),
    "half_life zero": _train("masking.half_life=0"),
    "eps above one": _train("masking.eps=1.5"),
    "t_min one": _train("masking.t_min=1"),
    "no model source": _train("model.arch=null"),
    "batch_size zero": _train("data.batch_size=0"),
    "val_fraction one": _train("data.val_fraction=1"),
    "lr zero": _train("optim.lr=0"),
    "max_steps zero": _train("trainer.max_steps=0"),
    "one beta": _train("optim.betas=[0.9]"),
    "beta above one": _train("optim.betas=[0.9,1.5]"),
    "warmup negative": _train("optim.warmup_steps=-1"),
    "weight decay negative": _train("optim.weight_decay=-0.1"),
    "min_lr_ratio above one": _train("optim.min_lr_ratio=2"),
    "grad_clip negative": _train("optim.grad_clip=-1"),
    "accelerator tpu": _train("trainer.accelerator=tpu"),
    "accelerator gpu absent": _train("trainer.accelerator=gpu"),
    "accelerator bogus": _train("trainer.accelerator=bogus"),
    "strategy bogus": _train("trainer.strategy=bogus"),
    "devices zero": _train("trainer.devices=0"),
    "devices negative": _train("trainer.devices=-2"),
    "devices word": _train("trainer.devices=many"),
    "num_nodes zero": _train("trainer.num_nodes=0"),
    "checkpoint interval negative": _train("trainer.checkpoint_every_n_steps=-1"),
    "accumulate zero": _train("trainer.accumulate_grad_batches=0"),
    "val interval zero": _train("trainer.val_every_n_steps=0"),
    "log interval zero": _train("trainer.log_every_n_steps=0"),
    "limit_val negative": _train("trainer.limit_val_batches=-1"),
    "throughput window zero": _train("trainer.throughput_window=0"),
    "num_workers negative": _train("data.num_workers=-1"),
    "val_rows zero": _train("data.val_rows=0"),
    "shuffle buffer zero": _train("data.shuffle_buffer=0"),
    "synthetic size one": _train("data.synthetic_size=1"),
    "synthetic max_number zero": _train("data.synthetic_max_number=0"),
    "seed negative": _train("seed=-1"),
    "override without =": ["train", TINY_AR, "attention.pattern"],
    # -- data
    "data path missing": _train("data.path={ws}/data/nowhere.jsonl"),
    "data empty file": _train("data.path={ws}/data/empty.jsonl"),
    "data garbage json": _train("data.path={ws}/data/garbage.json"),
    "data garbage parquet": _train("data.path={ws}/data/garbage.parquet"),
    "data one row": _train("data.path={ws}/data/one_row.jsonl"),
    "data missing column": _train("data.path={ws}/data/no_text.jsonl"),
    "data missing sft columns": _train("data.path={ws}/data/no_text.jsonl", "data.prompt_field=q",
                                       "data.response_field=a"),
    "data shorter than max_length": _train("data.path={ws}/data/short.jsonl", "data.max_length=512"),
    "data streaming empty": _train("data.path={ws}/data/empty.jsonl", "data.streaming=true"),
    "data streaming missing column": _train("data.path={ws}/data/no_text.jsonl", "data.streaming=true"),
    # -- model and resume
    "model folder missing": _train("model.name_or_path={ws}/nowhere", "model.arch=null"),
    "model checkpoint not trained yet": ["train", str(REPO / "experiments" / "tiny.yaml"),
                                         "model.name_or_path=outputs/nowhere/final"],
    "model arch unknown": _train("model.arch=bogus"),
    "model truncated weights": _train("model.name_or_path={ws}/ckpts/truncated", "model.arch=null"),
    "model broken tokenizer": _train("model.name_or_path={ws}/ckpts/bad_tokenizer", "model.arch=null",
                                     "model.tokenizer=null"),
    "model pickled bin": _train("model.name_or_path={ws}/ckpts/pickled_bin", "model.arch=null"),
    "resume corrupt last.ckpt": _train("output_dir={ws}/resume_corrupt", "resume=true"),
    "resume truncated last.ckpt": _train("output_dir={ws}/resume_truncated", "resume=true"),
    "resume pickled last.ckpt": _train("output_dir={ws}/resume_pickle", "resume=true"),
    "earlier run without resume": _train("output_dir={ws}/earlier_run"),
    # -- generate
    "generate empty prompt": _gen("good", "--prompt", ""),
    "generate blank prompt": ["generate", "{ws}/ckpts/good", "--prompt", "   "],
    "generate empty stop": _gen("good", "--stop", ""),
    "generate no prompt": ["generate", "{ws}/ckpts/good"],
    "generate prompts file missing": ["generate", "{ws}/ckpts/good", "--prompts-file", "{ws}/nowhere.txt"],
    "generate prompts file empty": ["generate", "{ws}/ckpts/good", "--prompts-file", "{ws}/prompts/empty.txt"],
    "generate checkpoint missing": _gen("nowhere"),
    "generate no dlm.yaml": _gen("no_meta"),
    "generate meta yaml error": _gen("meta_yaml"),
    "generate meta list": _gen("meta_list"),
    "generate meta python tag": _gen("meta_tag"),
    "generate meta bad pattern": _gen("bad_pattern"),
    "generate meta bad block": _gen("bad_block"),
    "generate meta zero block": _gen("zero_block"),
    "generate meta negative id": _gen("bad_id"),
    "generate meta string id": _gen("str_id"),
    "generate meta bad shift": _gen("bad_shift"),
    "generate meta bad mask token": _gen("bad_token"),
    "generate meta unknown key": _gen("extra_key"),
    "generate meta missing key": _gen("missing_key"),
    "generate truncated weights": _gen("truncated"),
    "generate broken tokenizer": _gen("bad_tokenizer"),
    "generate pickled bin": _gen("pickled_bin"),
    "generate absent cuda": _gen("good", "--device", "cuda:7"),
    "generate unknown device": _gen("good", "--device", "tpu"),
    "generate threshold above one": _gen("good", "--threshold", "2"),
    "generate zero tokens": _gen("good", "--max-new-tokens", "0"),
    "generate block zero": _gen("good", "--block-size", "0"),
    "generate unknown policy": _gen("good", "--policy", "bogus"),
    # -- eval
    "eval limit negative": ["eval", "{ws}/ckpts/good", "--limit", "-1"],
    "eval limit zero": ["eval", "{ws}/ckpts/good", "--limit", "0"],
    "eval fewshot negative": ["eval", "{ws}/ckpts/good", "--num-fewshot", "-1"],
    "eval batch zero": ["eval", "{ws}/ckpts/good", "--batch-size", "0"],
    "eval unknown task": ["eval", "{ws}/ckpts/good", "--tasks", "bogus_task"],
    "eval decode threshold": ["eval", "{ws}/ckpts/good", "--decode.threshold", "2"],
    "eval checkpoint missing": ["eval", "{ws}/ckpts/nowhere"],
    "eval meta bad pattern": ["eval", "{ws}/ckpts/bad_pattern", "--limit", "1"],
    "eval truncated weights": ["eval", "{ws}/ckpts/truncated", "--limit", "1"],
    "eval absent cuda": ["eval", "{ws}/ckpts/good", "--limit", "1", "--device", "cuda:7"],
    "eval mlflow run missing": ["eval", "{ws}/ckpts/good", "--limit", "1", "--mlflow-run", "0123abc",
                                "--tracking-uri", "sqlite:///{ws}/mlflow.db"],
    # -- bench, drift
    "bench threshold above one": ["bench", "{ws}/ckpts/good", "--thresholds", "2"],
    "bench batch zero": ["bench", "{ws}/ckpts/good", "--batch-sizes", "0"],
    "bench meta bad pattern": ["bench", "{ws}/ckpts/bad_pattern"],
    "bench truncated weights": ["bench", "{ws}/ckpts/truncated"],
    "drift checkpoint missing": ["drift", "{ws}/ckpts/nowhere", "--reference", "{ws}/ckpts/good"],
    "drift truncated weights": ["drift", "{ws}/ckpts/truncated", "--reference", "{ws}/ckpts/good"],
    # -- sweep
    "sweep max_parallel zero": ["sweep", "{ws}/sweeps/good.yaml", "--max-parallel", "0"],
    "sweep yaml syntax error": ["sweep", "{ws}/sweeps/broken.yaml"],
    "sweep yaml list": ["sweep", "{ws}/sweeps/list.yaml"],
    "sweep python tag": ["sweep", "{ws}/sweeps/python_tag.yaml"],
    "sweep unknown key": ["sweep", "{ws}/sweeps/unknown_key.yaml"],
    "sweep bad point": ["sweep", "{ws}/sweeps/bad_point.yaml"],
    "sweep bad trainer value": ["sweep", "{ws}/sweeps/bad_value.yaml"],
    "sweep accelerator absent": ["sweep", "{ws}/sweeps/tpu.yaml"],
    "sweep experiment missing": ["sweep", "{ws}/sweeps/no_experiment.yaml"],
    "sweep file missing": ["sweep", "{ws}/sweeps/nowhere.yaml"],
    "sweep override without =": ["sweep", "{ws}/sweeps/good.yaml", "eval.limit"],
    # -- flags argparse rejects
    "unknown command": ["trian", TINY_AR],
    "unknown flag": ["generate", "{ws}/ckpts/good", "--prompt", "x", "--thresold", "0.9"],
    "flag wrong type": ["generate", "{ws}/ckpts/good", "--prompt", "x", "--threshold", "high"],
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_there_are_at_least_80_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_fails_in_one_line_and_writes_nothing(name, ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)  # the default MLflow store (sqlite:///mlflow.db) and outputs/ would land here
    argv = [a.format(ws=ws) for a in CASES[name]]
    if argv[0] == "train":
        argv += [o for o in small_overrides(ws) if o.split("=")[0] not in {a.split("=")[0] for a in argv}]
    before = snapshot(ws)
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse
        status = exit_info.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    assert snapshot(ws) == before, err
    assert not (ws / "PWNED").exists()
