"""End to end on a real pretrained LM (SmolLM2-135M-Instruct from `make smollm2`): the imported folder decodes as
transformers does, a few bf16 training steps of the conversion presets run, and the converted checkpoints decode
exactly (cached == no-cache; speculative == the AR mode) in float32. Skipped, with the reason, where the folder has
not been imported (CI's fresh clone); minutes of CPU where it has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlm.decoding.engine import generate
from dlm.decoding.text import chat_format_for, encode_texts, load_for_decoding, render_prompts
from dlm.models.checkpoint import read_meta
from dlm.settings import DecodeConfig, load_config
from dlm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models/smollm2-135m-instruct"
DATA = REPO.parent / "shared/data/gsm8k/train.jsonl"
QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A book costs $12. How much do 3 books cost?"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason=f"{MODEL} not imported: run `make smollm2`"),
    pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} absent"),
]


def _short_run(tmp_path: Path, preset: str) -> Path:
    overrides = [f"output_dir={tmp_path}/out", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                 f"data.path={DATA}", "data.max_length=64", "data.batch_size=2", "data.val_fraction=0.001",
                 "trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.limit_val_batches=1",
                 "trainer.checkpoint_every_n_steps=2", "trainer.progress_bar=false", f"model.name_or_path={MODEL}"]
    return train(load_config(REPO / "experiments" / preset, overrides=overrides)).final_dir


def _decode(path: Path, **decode) -> list[list[int]]:
    backbone, meta = load_for_decoding(path, device="cpu")
    chat = chat_format_for(meta, backbone.tokenizer, True)
    ids, attention = encode_texts(backbone.tokenizer, render_prompts(backbone.tokenizer, QUESTIONS, chat))
    cfg = DecodeConfig(block_size=meta.block_size, shift=meta.shift, max_new_tokens=24, **decode)
    return generate(backbone.model, ids, attention_mask=attention, mask_token_id=backbone.mask_token_id, config=cfg,
                    eos_token_id=backbone.tokenizer.eos_token_id).tokens


def test_the_imported_model_decodes_as_transformers_generate():
    backbone, meta = load_for_decoding(MODEL, device="cpu")
    assert meta.pattern == "causal" and meta.source
    chat = chat_format_for(meta, backbone.tokenizer, True)
    text = render_prompts(backbone.tokenizer, QUESTIONS[:1], chat)
    ids, attention = encode_texts(backbone.tokenizer, text)
    ours = generate(backbone.model, ids, attention_mask=attention, config=DecodeConfig(mode="ar", max_new_tokens=16),
                    eos_token_id=backbone.tokenizer.eos_token_id).tokens[0]
    theirs = backbone.model.generate(ids, attention_mask=attention, max_new_tokens=16, do_sample=False)
    assert ours == theirs[0, ids.shape[1]:ids.shape[1] + len(ours)].tolist()


def test_conversion_in_bf16_decodes_the_same_with_and_without_the_cache(tmp_path):
    final = _short_run(tmp_path, "smollm2-135m.yaml")
    meta = read_meta(final)
    assert meta.pattern == "block_clean" and "<|im_start|>" in meta.chat_template
    assert _decode(final) == _decode(final, use_cache=False)


def test_joint_conversion_in_bf16_speculates_the_ar_modes_tokens(tmp_path):
    final = _short_run(tmp_path, "smollm2-135m-joint.yaml")
    assert read_meta(final).clean_context == "causal"
    with torch.inference_mode():
        ar = _decode(final, mode="ar")
        assert _decode(final, mode="speculative") == ar
        assert _decode(final, mode="speculative", speculative_form="branched", speculative_branches=2) == ar
