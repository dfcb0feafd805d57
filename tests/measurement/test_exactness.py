"""`dlm exactness`: fast decoders against their references on a tiny checkpoint; equal in float64/float32,
differences located and measured; bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch

from dlm.cli.main import main
from dlm.data.synthetic import format_example, problems
from dlm.measurement.exactness import Difference, PairResult, _difference, check_exactness
from dlm.models.checkpoint import CheckpointMeta, save_checkpoint
from dlm.settings import ConfigError
from tests.conftest import sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def joint(tmp_path_factory, tokenizer):
    """A tiny checkpoint with a causal clean context (so all three pairs apply) and a prompt file."""
    tmp = tmp_path_factory.mktemp("exact")
    bb = sharp_backbone("qwen3", tokenizer, dtype=torch.float32)
    meta = CheckpointMeta("block_clean", 4, "<|mask|>", bb.mask_token_id, clean_context="causal")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": format_example(p)["prompt"], "answer": p["answer"]}) + "\n"
                               for p in problems(5, seed=3)))
    return save_checkpoint(bb.model, bb.tokenizer, meta, tmp / "ckpt"), prompts


def test_every_pair_is_equal_in_float32(joint):
    ckpt, prompts = joint
    results = check_exactness(ckpt, prompts=str(prompts), num_prompts=5, batch_size=3, max_new_tokens=12)
    assert [(r.pair, r.equal, r.rows) for r in results] == [("cache", 5, 5), ("batch", 5, 5), ("speculative", 5, 5),
                                                            ("speculative-branched", 5, 5),
                                                            ("speculative-branched-2", 5, 5)]


def test_a_difference_is_located_and_its_margin_read_off_a_causal_forward(joint):
    from dlm.decoding.text import load_for_decoding

    ckpt, _ = joint
    backbone, _ = load_for_decoding(ckpt, device="cpu")
    want = [5, 6, 7]
    diff = _difference(backbone, "Question: 1 + 2?", 0, [5, 6, 9], want, causal=True)
    ids = torch.tensor([backbone.tokenizer("Question: 1 + 2?", add_special_tokens=False)["input_ids"] + want[:2]])
    logits = backbone.model(input_ids=ids).logits[0, -1]
    logits[backbone.mask_token_id] = -torch.inf
    top = torch.topk(logits, 2).values
    assert diff.position == 2 and diff.margin == pytest.approx(float(top[0] - top[1]), rel=1e-5)
    assert diff.resolution > 0
    assert "row 0 at token 2" in PairResult("speculative", 4, 5, [diff]).line()
    assert PairResult("cache", 5, 5, [Difference(1, 3, float("nan"), float("nan"))]).line().startswith("| cache | 5/5")


def test_bad_pair_or_count_is_one_line(joint, capsys):
    ckpt, prompts = joint
    allowed = "cache, batch, speculative, speculative-branched, speculative-branched-2"
    with pytest.raises(ConfigError, match=rf"^--pairs='spec': unknown pair; allowed: {allowed}"):
        check_exactness(ckpt, prompts=str(prompts), pairs=["spec"])
    assert main(["exactness", str(ckpt), "--prompts", str(prompts), "--num-prompts", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num-prompts=0: must be a positive integer"
