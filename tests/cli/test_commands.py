"""Each `dlm` subcommand through `main([...])` and `build_parser()`: its flags, its help, and bad flag values
failing in one `error:` line with exit status 2 before any model loads. tests/cli/test_main.py covers the
entry point itself (demo at L=4, config YAML, the config error in a subprocess, a torch-free parser)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from dlm.cli.dataclass_args import dataclass_from_args, given
from dlm.cli.main import COMMANDS, build_parser, main
from dlm.models.checkpoint import META_FILE, CheckpointMeta
from dlm.settings import DecodeConfig, EvalConfig, LogTarget
from tests.conftest import make_backbone, save_tiny

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments" / "tiny.yaml")
MISSING_CKPT = "/nonexistent/dlm-checkpoint"
"""Where the flag check comes before the checkpoint is read, a checkpoint that does not exist proves it."""


@pytest.fixture(scope="module")
def meta_only_ckpt(tmp_path_factory) -> str:
    """A folder with only `dlm.yaml` (block size 4): `generate` reads it before checking its decode flags,
    and any attempt to load weights from it would fail with a different error."""
    path = tmp_path_factory.mktemp("meta_only")
    (path / META_FILE).write_text(yaml.safe_dump(asdict(CheckpointMeta("block_clean", 4, "<|mask|>", 5))))
    return str(path)


def run_main(argv: list[str], capsys) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds) of `main(argv)`, whether it returns or argparse exits."""
    start = time.perf_counter()
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err, time.perf_counter() - start


# -- attention-demo, config -----------------------------------------------------------------------------------
def test_attention_demo_defaults_print_every_registered_pattern_at_length_8_block_4(capsys):
    assert main(["attention-demo"]) == 0
    headers = [line.split(";")[0] for line in capsys.readouterr().out.splitlines() if "(L=" in line]
    assert headers == [f"{p} (L=8, block_size=4)" for p in ("bidirectional", "block")] + [
        "block_clean (L=8, block_size=4, clean_context=block)", "block_window (L=8, block_size=4, window=2)",
        "causal (L=8, block_size=4)"]


def test_attention_demo_prints_only_the_patterns_asked_for_in_that_order(capsys):
    assert main(["attention-demo", "--patterns", "block_clean", "causal"]) == 0
    headers = [line.split(";")[0] for line in capsys.readouterr().out.splitlines() if "(L=" in line]
    assert headers == ["block_clean (L=8, block_size=4, clean_context=block)", "causal (L=8, block_size=4)"]


def test_config_takes_overrides_before_or_after_the_yaml_and_prints_loadable_yaml(capsys):
    assert main(["config", "attention.block_size=8", TINY, "trainer.max_steps=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["attention"]["block_size"] == 8 and resolved["trainer"]["max_steps"] == 3


def test_config_with_an_unknown_key_suggests_the_near_match_in_one_line(capsys):
    status, out, err, _ = run_main(["config", TINY, "attention.blok_size=8"], capsys)
    assert status == 2 and out == ""
    assert err.splitlines() == [
        "error: attention.blok_size: unknown key (did you mean 'block_size'?); allowed: pattern, block_size, backend, "
        "clean_context, options, block_size_schedule"]


# -- the parser -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_subcommand_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dlm {command} ")


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in COMMANDS)


@pytest.mark.parametrize("command", ["bench", "eval", "drift"])
def test_bench_eval_and_drift_take_the_mlflow_run_to_log_into(command):
    extra = ["--reference", "ar"] if command == "drift" else []
    args = build_parser().parse_args([command, "ckpt", *extra, "--mlflow-run", "abc", "--tracking-uri", "sqlite:///m.db"])
    assert dataclass_from_args(args, LogTarget) == LogTarget("abc", "sqlite:///m.db")
    assert dataclass_from_args(build_parser().parse_args([command, "ckpt", *extra]), LogTarget) == LogTarget()


def test_generate_flags_are_decode_config_fields_without_shift(capsys):
    args = build_parser().parse_args(["generate", "ckpt", "--no-cache", "--threshold", "0.5", "--prompt", "a",
                                      "--prompt", "b"])
    assert (args.use_cache, args.threshold, args.prompt) == (False, 0.5, ["a", "b"])
    status, _, err, _ = run_main(["generate", "ckpt", "--shift"], capsys)
    assert status == 2 and "unrecognized arguments: --shift" in err


def test_eval_flags_build_eval_config_with_the_decode_flags_apart():
    args = build_parser().parse_args(["eval", "ckpt", "--tasks", "gsm8k,mmlu", "--limit", "0.5", "--num-fewshot", "0",
                                      "--apply-chat-template", "--decode.block_size", "8"])
    settings = dataclass_from_args(args, EvalConfig)
    assert (settings.tasks, settings.limit, settings.num_fewshot) == (["gsm8k", "mmlu"], 0.5, 0)
    assert settings.apply_chat_template is True and settings.decode == {}
    assert given(args, DecodeConfig, prefix="decode.") == {"block_size": 8}


def test_sweep_takes_file_overrides_and_its_run_switches():
    args = build_parser().parse_args(["sweep", "s.yaml", "eval.limit=2", "output_dir=/tmp/s", "--dry-run",
                                      "--no-report", "--launcher", "slurm"])
    assert args.sweep_overrides == ["eval.limit=2", "output_dir=/tmp/s"]
    assert (args.dry_run, args.report, args.launcher) == (True, False, "slurm")


# -- bad flag values: one line, exit 2, nothing loaded --------------------------------------------------------
BAD_FLAGS = {
    "bench-threshold-above-one": (["bench", MISSING_CKPT, "--thresholds", "1.5"],
                                  "error: bench.thresholds=1.5: must be in (0, 1] (1.0 = one token per pass unless "
                                  "certain)"),
    "bench-empty-thresholds": (["bench", MISSING_CKPT, "--thresholds", ""],
                               "error: bench.thresholds=[]: need at least one threshold "
                               "(or bench.tokens_per_pass, decoders, ar_mode)"),
    "bench-batch-size-zero": (["bench", MISSING_CKPT, "--batch-sizes", "1,0"],
                              "error: bench.batch_sizes=0: must be a positive integer"),
    "sweep-max-parallel-zero": (["sweep", "X.yaml", "--max-parallel", "0"], "error: max_parallel=0: must be >= 1"),
    "sweep-unknown-launcher": (["sweep", "X.yaml", "--launcher", "k8s"],
                               "dlm sweep: error: argument --launcher: invalid choice: 'k8s' (choose from 'local', "
                               "'slurm')"),
    "eval-negative-limit": (["eval", MISSING_CKPT, "--limit", "-1"],
                            "error: eval.limit=-1.0: must be > 0 (a fraction if < 1)"),
    "eval-negative-fewshot": (["eval", MISSING_CKPT, "--num-fewshot", "-1"],
                              "error: eval.num_fewshot=-1: must be >= 0"),
    "eval-no-tasks": (["eval", MISSING_CKPT, "--tasks", ""], "error: eval.tasks=[]: no task given; e.g. gsm8k,mmlu"),
    "eval-misspelt-decode-flag": (["eval", MISSING_CKPT, "--decode.treshold", "0.5"],
                                  "dlm: error: unrecognized arguments: --decode.treshold 0.5"),
    "eval-decode-threshold-above-one": (["eval", MISSING_CKPT, "--decode.threshold", "1.5"],
                                        "error: eval.decode.threshold=1.5: must be in (0, 1]"),
    "eval-decode-bool-not-true-false": (["eval", MISSING_CKPT, "--decode.use_cache", "maybe"],
                                        "dlm eval: error: argument --decode.use_cache: 'maybe': must be true or false"),
    "bench-train-unknown-pattern": (["bench-train", TINY, "--patterns", "blok"],
                                    "error: bench_train.patterns='blok': unknown pattern; allowed: bidirectional, "
                                    "block, block_clean, block_window, causal"),
    "bench-train-zero-steps": (["bench-train", TINY, "--steps", "0"],
                               "error: bench_train.steps=0: must be a positive integer"),
    "drift-negative-step": (["drift", MISSING_CKPT, "--reference", "ar", "--step", "-1"],
                            "error: drift.step=-1: must be >= 0"),
    "report-threshold-not-a-number": (["report", "s", "--threshold", "abc"],
                                      "dlm report: error: argument --threshold: invalid float value: 'abc'"),
    "generate-without-prompt": (["generate", MISSING_CKPT],
                                "error: --prompt: give at least one prompt (--prompt TEXT or --prompts-file FILE)"),
    "generate-missing-prompts-file": (["generate", MISSING_CKPT, "--prompts-file", "/nonexistent/prompts.txt"],
                                      "error: --prompts-file='/nonexistent/prompts.txt': no such file"),
    "generate-unknown-policy": (["generate", MISSING_CKPT, "--prompt", "a", "--policy", "greedy"],
                                "dlm generate: error: argument --policy: invalid choice: 'greedy' (choose from "
                                "'threshold', 'factor', 'fixed')"),
}


@pytest.mark.parametrize("argv, error", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_a_bad_flag_value_is_one_error_line_and_exit_2_before_anything_loads(argv, error, capsys):
    status, out, err, seconds = run_main(argv, capsys)
    assert status == 2 and out == ""
    assert [line for line in err.splitlines() if "error:" in line] == [error]
    assert "Traceback" not in err and seconds < 5


def test_generate_checks_the_sub_block_against_the_checkpoints_block_size_before_loading_weights(meta_only_ckpt,
                                                                                                  capsys):
    status, out, err, seconds = run_main(["generate", meta_only_ckpt, "--prompt", "hi", "--sub-block-size", "3"],
                                         capsys)
    assert status == 2 and out == ""
    assert err.splitlines() == ["error: decode.sub_block_size=3: must divide decode.block_size=4; allowed: 1, 2, 4"]
    assert seconds < 5


def test_bench_takes_an_experiment_yaml_and_times_random_weights_at_its_shape(tmp_path, capsys):
    shape = tmp_path / "shape.yaml"
    shape.write_text(yaml.safe_dump({"name": "shape", "model": {
        "arch": "qwen3", "tokenizer": "builtin:tiny", "config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256}},
        "attention": {"pattern": "block_clean", "block_size": 4}, "data": {"max_length": 32}}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tom has 3 apples", "answer": "3"}\n')
    status, out, err, _ = run_main(["bench", str(shape), "--tokens-per-pass", "2", "--thresholds", "",
                                    "--batch-sizes", "1", "--no-cache-thresholds", "", "--max-new-tokens", "8",
                                    "--ignore-eos", "--repeats", "1", "--warmup", "0", "--prompts", str(prompts),
                                    "--no-hf-generate", "--no-one-token-reference",
                                    "--output-dir", str(tmp_path / "out")], capsys)
    assert status == 0, err
    assert "| dLM cached, fixed | 1 | n 2 |" in out


def test_speculative_generate_with_a_block_clean_context_checkpoint_is_one_error_line(meta_only_ckpt, capsys):
    status, out, err, seconds = run_main(["generate", meta_only_ckpt, "--prompt", "hi", "--mode", "speculative"],
                                         capsys)
    assert status == 2 and out == ""
    assert err.splitlines() == [
        "error: decode.mode='speculative': needs a checkpoint trained with attention.clean_context=causal "
        "(this one: pattern block_clean, clean_context block); allowed: diffusion, ar"]
    assert seconds < 5


def test_speculative_generate_on_a_causal_clean_context_checkpoint_matches_ar_mode(tokenizer, tmp_path, capsys):
    from dlm.models.checkpoint import save_checkpoint

    bb = make_backbone("qwen3", tokenizer)
    meta = CheckpointMeta("block_clean", 4, "<|mask|>", bb.mask_token_id, clean_context="causal")
    ckpt = str(save_checkpoint(bb.model, bb.tokenizer, meta, tmp_path / "joint"))
    texts, stats = {}, {}
    for mode, form in (("ar", "fused"), ("speculative", "fused"), ("speculative", "separate")):
        status, out, err, _ = run_main(["generate", ckpt, "--prompt", "Tom has 3 apples", "--mode", mode,
                                        "--speculative-form", form, "--max-new-tokens", "9"], capsys)
        assert status == 0, err
        texts[mode, form], stats[mode, form] = out.split("--- stats")
    assert texts["ar", "fused"] == texts["speculative", "fused"] == texts["speculative", "separate"]
    assert stats["ar", "fused"].startswith(" (AR mode of the dLM,")
    assert stats["speculative", "fused"].startswith(" (speculative (fused), drafts of 3,")
    assert stats["speculative", "separate"].startswith(" (speculative (separate), drafts of 3,")


def test_a_bad_flag_fails_without_importing_torch():
    code = ("import sys; from dlm.cli.main import main; "
            f"status = main(['bench', {MISSING_CKPT!r}, '--thresholds', '1.5']); print(status, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "2 False", proc.stderr
    assert proc.stderr.splitlines() == [
        "error: bench.thresholds=1.5: must be in (0, 1] (1.0 = one token per pass unless certain)"]


# -- bad values checked before any compute: the demo's sizes, an absent device, an unknown dtype -------------
@pytest.fixture(scope="module")
def tiny_ckpt(tokenizer, tmp_path_factory) -> str:
    """A real tiny dlm checkpoint: the device is only used once its weights are loaded."""
    return str(save_tiny(make_backbone("qwen3", tokenizer), tmp_path_factory.mktemp("ckpt") / "block_clean"))


@pytest.mark.parametrize("seq_len", ["0", "-3"])
def test_attention_demo_with_a_non_positive_length_is_one_error_line(seq_len, capsys):
    status, _, err, _ = run_main(["attention-demo", "--seq-len", seq_len], capsys)
    assert status == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "seq" in line and seq_len in line


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_generate_with_an_unknown_device_is_one_error_line(tiny_ckpt, device, capsys):
    status, _, err, _ = run_main(["generate", tiny_ckpt, "--prompt", "hi", "--max-new-tokens", "4", "--device", device],
                                 capsys)
    assert status == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert f"device={device!r}" in line


def test_eval_with_an_unknown_dtype_fails_at_the_flag_check(capsys):
    status, _, err, _ = run_main(["eval", MISSING_CKPT, "--dtype", "float33"], capsys)
    assert status == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "float33" in line
