"""The pattern added as one file: a sliding window of clean blocks. It trains through the real Trainer, records its
window in the checkpoint, decodes over the KV cache exactly and scores by the decoder's rule (the registry-wide
checks in test_consistency cover it too)."""

from __future__ import annotations

import pytest
import torch

from dlm.decoding.engine import generate
from dlm.decoding.layout import Layout
from dlm.decoding.text import left_pad, load_for_decoding
from dlm.evaluation.likelihood import score_continuations
from dlm.tensor import patterns
from dlm.tensor.attention import dense_mask
from dlm.tensor.patterns import load_experiment
from dlm.training.trainer import train
from tests.helpers import small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_literal_mask_l8_block2_window1():
    # rows/cols: noisy n0..n7, clean c0..c7; block b sees clean block b-1 only (and itself)
    rows = ["##..............", "##..............", "..##....##......", "..##....##......",
            "....##....##....", "....##....##....", "......##....##..", "......##....##..",
            "........##......", "........##......", "........####....", "........####....",
            "..........####..", "..........####..", "............####", "............####"]
    mask = dense_mask(patterns.get("block_window", block_size=2, options={"window": 1}), 8)
    assert ["".join("#" if v else "." for v in row) for row in mask.tolist()] == rows


def test_a_window_wider_than_the_sequence_is_block_clean():
    wide = patterns.get("block_window", block_size=2, options={"window": 8})
    assert torch.equal(dense_mask(wide, 8), dense_mask(patterns.get("block_clean", block_size=2), 8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("window")
    overrides = small_overrides(tmp, **{"model.name_or_path": "null", "model.tokenizer": "builtin:tiny",
                                        "attention.pattern": "block_window", "attention.options.window": "1"})
    torch.manual_seed(0)
    return train(load_experiment("experiments/tiny.yaml", overrides=overrides))


def test_it_trains_and_the_checkpoint_records_its_window(trained):
    assert trained.final_dir.is_dir()
    _, meta = load_for_decoding(trained.final_dir)
    assert meta.attention_pattern == patterns.get("block_window", block_size=4, options={"window": 1})


def test_the_checkpoint_decodes_over_the_cache_as_without_it(trained):
    backbone, meta = load_for_decoding(trained.final_dir)
    ids, attention = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13]], 0)
    common = dict(attention_mask=attention, mask_token_id=backbone.mask_token_id, block_size=4, max_new_tokens=13,
                  threshold=0.5, pattern=meta.attention_pattern)
    cached = generate(backbone.model, ids, **common)
    assert cached.tokens == generate(backbone.model, ids, use_cache=False, **common).tokens


def test_tokens_outside_the_window_do_not_reach_the_decode(trained):
    """Prompt tokens more than one block before the first generated block leave its logits unchanged (the test
    model has one layer; a deeper one reaches further by stacking windows, as sliding-window attention does)."""
    backbone, meta = load_for_decoding(trained.final_dir)
    pattern, model, mask_id = meta.attention_pattern, backbone.model, backbone.mask_token_id
    prompt = list(range(5, 17))  # blocks 0, 1, 2; the first generated block is block 3, its window block 2
    layout = Layout.build(torch.ones(1, 12, dtype=torch.long), 4, pattern)
    mask = layout.mask(0, 16, 16, (12, 16))

    def block_logits(tokens):
        with torch.no_grad():
            return model(input_ids=torch.tensor([tokens + [mask_id] * 4]), attention_mask=mask,
                         position_ids=layout.position_ids).logits[0, 12:]

    far, near = block_logits([40] + prompt[1:]), block_logits(prompt[:9] + [40] + prompt[10:])
    assert torch.equal(far, block_logits(prompt)) and not torch.equal(near, block_logits(prompt))


def test_a_one_token_continuation_scores_the_decoders_distribution(trained):
    backbone, meta = load_for_decoding(trained.final_dir)
    pattern, model, mask_id = meta.attention_pattern, backbone.model, backbone.mask_token_id
    context, target = list(range(5, 18)), 30
    (score, _), = score_continuations(model, [(context, [target])], pattern=pattern, mask_token_id=mask_id,
                                      shift=False, max_length=64, pad_token_id=0, batch_size=1)
    p = len(context)
    layout = Layout.build(torch.ones(1, p, dtype=torch.long), 1, pattern)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + [mask_id]]), attention_mask=layout.mask(0, p + 1, p + 1,
                       (p, p + 1)), position_ids=layout.position_ids).logits[0, -1].double()
    logits[mask_id] = -torch.inf
    assert score == pytest.approx(float(logits.log_softmax(-1)[target]), abs=1e-4)
