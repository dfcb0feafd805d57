"""The benchmark grid: setting labels and order, measurements on a real tiny sharpened model (the same tokens
as the decoders called directly), and the rows with their speedups from hand-built measurements."""

from __future__ import annotations

import pytest
import torch

from dlm.data.prompts import Prompt
from dlm.decoding.ar import ar_generate
from dlm.decoding.engine import generate
from dlm.measurement.grid import (
    METHODS,
    SPECULATIVE,
    Batch,
    Measurement,
    Setting,
    Target,
    build_rows,
    decode_batch,
    decode_config,
    encode_batches,
    measure,
    measure_grid,
    settings_grid,
    share_same_answer,
)
from dlm.settings import BenchConfig, ConfigError
from tests.conftest import sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [Prompt("Tom has 3 apples and", "3"), Prompt("Q: 12 + 7 =", "19"), Prompt("x", None)]
GEN = 8


@pytest.fixture(scope="module")
def target(tokenizer) -> Target:
    bb = sharp_backbone("qwen3", tokenizer)
    return Target(bb.model, bb.tokenizer, bb.mask_token_id, block_size=4)


def direct(target: Target, setting: Setting, batch: Batch, eos: int | None):
    """The decoder `setting` stands for, called directly with the settings it implies."""
    if setting.method == "ar-hf":
        return ar_generate(target.model, batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=GEN,
                           eos_token_id=eos)
    return generate(target.model, batch.input_ids, attention_mask=batch.attention_mask,
                    mask_token_id=target.mask_token_id, eos_token_id=eos, block_size=target.block_size,
                    max_new_tokens=GEN, threshold=setting.threshold or 1.0,
                    mode={"ar": "ar", "ar-self": "ar", "spec": "speculative", "spec-sep": "speculative",
                          "spec-br": "speculative"}.get(setting.method, "diffusion"),
                    speculative_form={"spec-sep": "separate", "spec-br": "branched"}.get(setting.method, "fused"),
                    policy="fixed" if setting.tokens_per_pass else "threshold",
                    tokens_per_pass=setting.tokens_per_pass or 1, early_exit=setting.method != "dlm-v2count",
                    one_token_per_forward=setting.method == "dlm-1tpf", use_cache=setting.method != "dlm-nocache")


def measurement(seconds, generated=120, *, row_forwards=60, calls=3, nfe_total=30, num_prompts=6, exact_match=None):
    return Measurement(list(seconds), generated, row_forwards, calls, nfe_total, num_prompts, exact_match)


# --- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, label", [
    (Setting("dlm", 4, 0.9), "dlm_batch4_t0.9"),
    (Setting("dlm", 1, 1.0), "dlm_batch1_t1"),
    (Setting("dlm-nocache", 2, 0.35), "dlm-nocache_batch2_t0.35"),
    (Setting("ar", 8), "ar_batch8"),
    (Setting("dlm-1tpf", 1), "dlm-1tpf_batch1"),
    (Setting("dlm-fixed", 1, tokens_per_pass=3), "dlm-fixed_batch1_n3"),
])
def test_label_names_method_batch_size_and_threshold(setting, label):
    assert setting.label == label


def test_settings_grid_per_batch_size_is_ar_then_reference_then_cached_then_no_cache_then_v2():
    grid = settings_grid(BenchConfig(batch_sizes=[1, 4], thresholds=[0.5, 0.9], no_cache_thresholds=[0.9],
                                     tokens_per_pass=[3], no_cache_tokens_per_pass=[3], v2_count_thresholds=[0.9],
                                     speculative=True))
    per_batch = lambda b: [Setting("ar", b), Setting("ar-hf", b), Setting("dlm-1tpf", b),  # noqa: E731
                           Setting("dlm", b, 0.5), Setting("dlm", b, 0.9), Setting("dlm-fixed", b, tokens_per_pass=3),
                           Setting("dlm-nocache", b, 0.9), Setting("dlm-nocache", b, tokens_per_pass=3),
                           Setting("dlm-v2count", b, 0.9), Setting("ar-self", b), Setting("spec", b),
                           Setting("spec-sep", b), Setting("spec-br", b)]
    assert grid == per_batch(1) + per_batch(4)
    assert {s.method for s in grid} == set(METHODS)


def test_settings_grid_without_optional_rows_has_only_ar_the_reference_and_cached():
    grid = settings_grid(BenchConfig(batch_sizes=[2], thresholds=[0.7], no_cache_thresholds=[], hf_generate=False))
    assert grid == [Setting("ar", 2), Setting("dlm-1tpf", 2), Setting("dlm", 2, 0.7)]
    grid = settings_grid(BenchConfig(batch_sizes=[1], thresholds=[], tokens_per_pass=[2], no_cache_thresholds=[],
                                     hf_generate=False, one_token_reference=False))
    assert grid == [Setting("ar", 1), Setting("dlm-fixed", 1, tokens_per_pass=2)]


# --- Measurement and build_rows -----------------------------------------------------------------------------------


def test_tokens_per_sec_per_repeat_and_tpf_over_the_forwards_each_prompt_took_part_in():
    m = measurement([2.0, 4.0], generated=120, row_forwards=60)
    assert m.tokens_per_sec == [60.0, 30.0]
    assert m.tpf == 2.0
    assert measurement([1.0], generated=0, row_forwards=0).tpf == 0.0  # no forwards: no division by zero


def test_rows_take_median_min_max_tokens_per_sec_and_means_per_call_and_prompt():
    (row,) = build_rows({Setting("dlm", 2, 0.9): measurement([1.0, 4.0, 2.0], exact_match=0.5)})
    assert (row.method, row.batch_size, row.threshold) == ("dlm", 2, 0.9)
    assert (row.tokens_per_sec, row.tokens_per_sec_min, row.tokens_per_sec_max) == (60.0, 30.0, 120.0)
    assert (row.tpf, row.nfe, row.tokens_per_prompt, row.exact_match) == (2.0, 10.0, 20.0, 0.5)
    assert row.speedup_vs_ar is None and row.speedup_cache is None  # nothing to compare with


def test_speedups_divide_by_the_ar_row_of_the_same_batch_size_and_the_no_cache_row_of_the_same_threshold():
    measurements = {
        Setting("ar", 1): measurement([4.0]),  # 30 tokens/s
        Setting("dlm-1tpf", 1): measurement([6.0]),  # 20
        Setting("dlm", 1, 0.9): measurement([1.0]),  # 120
        Setting("dlm", 1, 0.5): measurement([0.5]),  # 240
        Setting("dlm-nocache", 1, 0.9): measurement([2.0]),  # 60
        Setting("ar", 2): measurement([1.0]),  # 120
        Setting("dlm", 2, 0.9): measurement([0.5]),  # 240
        Setting("dlm", 4, 0.9): measurement([0.5]),  # no AR row at batch 4
    }
    rows = build_rows(measurements)
    assert [(r.method, r.batch_size, r.threshold) for r in rows] == [(s.method, s.batch_size, s.threshold)
                                                                      for s in measurements]
    assert [r.speedup_vs_ar for r in rows] == [1.0, pytest.approx(2 / 3), 4.0, 8.0, 2.0, 1.0, 2.0, None]
    assert [r.speedup_cache for r in rows] == [None, None, 2.0, None, None, None, None, None]


# --- on a real tiny model -----------------------------------------------------------------------------------------


def test_encode_batches_left_pads_prompts_without_special_tokens_in_batches_of_the_size(target):
    batches = encode_batches(target.tokenizer, PROMPTS, 2, torch.device("cpu"))
    assert [b.answers for b in batches] == [["3", "19"], [None]]
    rows = [target.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert [len(r) for r in rows] == [8, 9, 1]
    first, last = batches
    assert first.input_ids.shape == first.attention_mask.shape == (2, 9)
    assert first.attention_mask.tolist() == [[0] + [1] * 8, [1] * 9]  # the shorter prompt padded first
    assert first.input_ids[0, 1:].tolist() == rows[0] and first.input_ids[1].tolist() == rows[1]
    assert last.input_ids.tolist() == [rows[2]] and last.attention_mask.tolist() == [[1]]


@pytest.mark.parametrize("setting", [Setting("ar", 2), Setting("ar-hf", 2), Setting("dlm-1tpf", 2),
                                     Setting("dlm", 2, 0.3), Setting("dlm-fixed", 2, tokens_per_pass=2),
                                     Setting("dlm-nocache", 2, 0.3), Setting("dlm-v2count", 2, 0.3),
                                     Setting("spec", 2)],
                         ids=lambda s: s.label)
def test_decode_batch_gives_the_same_tokens_as_the_decoder_called_directly(target, setting):
    for batch in encode_batches(target.tokenizer, PROMPTS, 2, target.device):
        out = decode_batch(target, setting, batch, max_new_tokens=GEN, eos=target.tokenizer.eos_token_id)
        assert out == direct(target, setting, batch, target.tokenizer.eos_token_id)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_measure_counts_what_generate_called_directly_produces(target, ignore_eos):
    setting = Setting("dlm", 2, 0.3)
    batches = encode_batches(target.tokenizer, PROMPTS, 2, target.device)
    outs = [direct(target, setting, b, None if ignore_eos else target.tokenizer.eos_token_id) for b in batches]
    m = measure(target, setting, batches, max_new_tokens=GEN, repeats=2, ignore_eos=ignore_eos)
    assert m.generated == sum(sum(o.num_generated) for o in outs)
    assert m.nfe_total == sum(o.nfe for o in outs) and m.row_forwards == sum(sum(o.row_forwards) for o in outs)
    assert (m.calls, m.num_prompts, len(m.seconds), m.exact_match) == (2, 3, 2, None)
    assert all(s > 0 for s in m.seconds)
    if ignore_eos:
        assert m.generated == GEN * len(PROMPTS)
    assert m.tpf > 1.0  # the sharpened model commits several tokens in some passes


def test_one_token_per_forward_and_ar_measure_one_token_per_forward(target):
    batches = encode_batches(target.tokenizer, PROMPTS, 1, target.device)
    for setting in (Setting("ar", 1), Setting("ar-hf", 1), Setting("dlm-1tpf", 1)):
        m = measure(target, setting, batches, max_new_tokens=GEN, ignore_eos=True)
        assert (m.tpf, m.nfe_total, m.generated) == (1.0, GEN * len(PROMPTS), GEN * len(PROMPTS))


def test_speculative_rows_generate_the_ar_rows_tokens(target):
    batches = encode_batches(target.tokenizer, PROMPTS, 2, target.device)
    for batch in batches:
        ar = decode_batch(target, Setting("ar", 2), batch, max_new_tokens=GEN, eos=None)
        for method in SPECULATIVE:
            assert decode_batch(target, Setting(method, 2), batch, max_new_tokens=GEN, eos=None).tokens == ar.tokens


def test_speculative_rows_report_the_share_of_prompts_equal_to_the_checkpoints_own_ar_mode(target):
    fewer = "mode=speculative speculative_form=branched speculative_branches=2"  # a decoder row is one too
    grid = {Setting(m, 1): target for m in ("ar", "ar-self", *SPECULATIVE)} | {Setting("dlm", 1, decoder=fewer): target}
    rows = build_rows(measure_grid(grid, PROMPTS, max_new_tokens=GEN, repeats=1, warmup=0, ignore_eos=True,
                                   scored=False))
    same = {r.method + r.decoder: r.same_as_ar_mode for r in rows}
    assert same == {"ar": None, "ar-self": None, "spec": 1.0, "spec-sep": 1.0, "spec-br": 1.0, "dlm" + fewer: 1.0}
    assert not Setting("dlm", 1, decoder="policy=factor").speculative
    assert build_rows({Setting("spec", 1): measurement([1.0])})[0].same_as_ar_mode is None  # no AR mode row


def test_scored_measure_reports_exact_match_of_the_answers(target):
    batches = encode_batches(target.tokenizer, PROMPTS[:2], 2, target.device)
    m = measure(target, Setting("dlm", 2, 0.3), batches, max_new_tokens=GEN, scored=True)
    assert m.exact_match == 0.0  # a random model writes no '#### 3'


def test_measure_grid_times_every_setting_repeats_times_with_the_counts_of_one_measure(target):
    grid = {Setting("dlm", 2, 0.3): target, Setting("dlm-nocache", 2, 0.3): target}
    out = measure_grid(grid, PROMPTS, max_new_tokens=GEN, repeats=3, warmup=1, ignore_eos=True, scored=False)
    assert list(out) == list(grid)
    for setting, m in out.items():
        once = measure(target, setting, encode_batches(target.tokenizer, PROMPTS, 2, target.device),
                       max_new_tokens=GEN, ignore_eos=True)
        assert len(m.seconds) == 3
        assert (m.generated, m.row_forwards, m.nfe_total, m.calls) == (once.generated, once.row_forwards,
                                                                      once.nfe_total, once.calls)


def test_any_decoder_setting_is_a_row_the_factor_policy_included():
    grid = settings_grid(BenchConfig(batch_sizes=[1], thresholds=[], decoders=["policy=factor factor=1.5"],
                                     no_cache_thresholds=[], hf_generate=False, one_token_reference=False))
    assert grid == [Setting("ar", 1), Setting("dlm", 1, decoder="policy=factor factor=1.5")]
    target = Target(model=None, tokenizer=None, mask_token_id=0, block_size=4)
    cfg = decode_config(target, grid[1], max_new_tokens=8)
    assert (cfg.policy, cfg.factor, cfg.block_size, cfg.threshold) == ("factor", 1.5, 4, 0.9)
    assert grid[1].label == "dlm_batch1_policy-factor_factor-1.5"


def test_a_bad_decoder_setting_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"^bench.decoders='policy=factr': .*decode.policy='factr': unknown"):
        BenchConfig(decoders=["policy=factr"])
    with pytest.raises(ConfigError, match=r"^bench.decoders='polcy=factor': unknown decoder field 'polcy'"):
        BenchConfig(decoders=["polcy=factor"])


def test_outputs_without_an_answer_do_not_agree_on_one():
    assert share_same_answer(["18", None, "3", None], ["18", None, "4", "5"]) == 0.25
    assert share_same_answer([None, None], [None, None]) == 0.0
    assert share_same_answer([], []) is None
