"""`dlm` command line: parses arguments and calls library functions, nothing else.

Bad input (a ConfigError) prints one `error: ...` line and exits 2, before any compute starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from dlm.settings.experiment import PATTERNS, ConfigError


def _attention_demo(args: argparse.Namespace) -> None:
    from dlm.tensor.attention import describe

    for pattern in args.patterns or PATTERNS:
        print(describe(pattern, args.seq_len, args.block_size), end="\n\n")


def _config(args: argparse.Namespace) -> None:
    from dlm.settings.experiment import load_config, to_yaml

    print(to_yaml(load_config(*args.configs, overrides=args.overrides)), end="")


def _train(args: argparse.Namespace) -> None:
    from dlm.settings.experiment import load_config
    from dlm.training.trainer import train

    result = train(load_config(*args.configs, overrides=args.overrides))
    print(f"final checkpoint: {result.final_dir}")
    print(f"mlflow run: {result.run_id} ({result.tracking_uri}); browse with: mlflow ui --backend-store-uri {result.tracking_uri}")
    for key in sorted(k for k in result.metrics if k.startswith(("val/", "train/loss"))):
        print(f"{key}: {result.metrics[key]:.4f}")


def _generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dlm.models.checkpoint import read_meta
    from dlm.settings.experiment import ConfigError
    from dlm.decoding.text import complete, decode_config_for, load_for_decoding

    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise ConfigError(f"--prompts-file={args.prompts_file!r}: no such file")
        prompts += [line.replace("\\n", "\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("--prompt: give at least one prompt (--prompt TEXT or --prompts-file FILE)")
    decode = decode_config_for(read_meta(args.checkpoint), block_size=args.block_size, threshold=args.threshold, max_new_tokens=args.max_new_tokens,
                               sub_block_size=args.sub_block_size, temperature=args.temperature, top_p=args.top_p,
                               use_cache=not args.no_cache, one_token_per_forward=args.one_token_per_forward)
    backbone, meta = load_for_decoding(args.checkpoint, device=args.device)
    result = complete(backbone, meta, prompts, decode, ar=args.ar, stop=args.stop)
    for prompt, text in zip(prompts, result.texts):
        print(f"--- prompt\n{prompt}\n--- completion\n{text}")
    out = result.output
    mode = "AR baseline" if args.ar or meta.pattern == "causal" else f"parallel, block {decode.block_size}, threshold {decode.threshold}"
    print(f"--- stats ({mode}): generated {sum(out.num_generated)} tokens, NFE {out.nfe}, "
          f"TPF {out.tokens_per_forward:.2f}, {result.tokens_per_second:.1f} tokens/s")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml [key=value ...]",
                   help="experiment YAML files, then dotlist overrides such as attention.block_size=32")


def _split_overrides(args: argparse.Namespace) -> None:
    """argparse cannot tell `a.yaml` from `k=v` in one nargs list; split them here."""
    if hasattr(args, "configs"):
        items = args.configs
        args.configs = [c for c in items if "=" not in c]
        args.overrides = [c for c in items if "=" in c]


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--patterns", nargs="*", choices=PATTERNS)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="dlm checkpoint folder (HF format + dlm.yaml)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompts-file", help="one prompt per line (write \\n for a newline inside a prompt)")
    p.add_argument("--block-size", type=int, help="decode block size (default: the training block size)")
    p.add_argument("--threshold", type=float, help="confidence threshold in (0, 1] (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sub-block-size", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--stop", action="append", help="stop string; repeatable")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every pass (reference)")
    p.add_argument("--one-token-per-forward", action="store_true", help="the non-parallel reference")
    p.add_argument("--ar", action="store_true", help="decode autoregressively with transformers' generate")
    p.add_argument("--device", default="auto")


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], object]]


def _commands() -> list[Command]:
    """(name, help, add arguments, run) per subcommand; none of these modules imports torch at import time."""
    from dlm.cli import bench_args as bench_cli
    from dlm.evaluation import evaluate
    from dlm.experiments import report, sweep, train_bench
    from dlm.measurement.drift import add_drift_arguments, run_drift

    return [
        ("attention-demo", "print the attention patterns for a small sequence", _add_demo_args, _attention_demo),
        ("config", "print the resolved, validated experiment config", _add_config_args, _config),
        ("train", "train (AR pretraining or AR-to-dLM conversion) from an experiment config", _add_config_args, _train),
        ("generate", "complete prompts with a dlm checkpoint (cached parallel decoding)", _add_generate_args, _generate),
        ("bench", "tokens/s, TPF, NFE vs the AR baseline; table, JSON, Pareto plot",
         bench_cli.add_bench_arguments, bench_cli.run_from_args),
        ("eval", "evaluate a checkpoint with lm-eval (gsm8k, mmlu, gsm8k_synthetic; offline variants)",
         evaluate.add_eval_arguments, evaluate.run_from_args),
        ("sweep", "run a sweep: every point trained, benchmarked and evaluated in a nested MLflow run",
         sweep.add_sweep_arguments, sweep.run_sweep_from_args),
        ("report", "a sweep's summary table and figures, read back from MLflow",
         report.add_report_arguments, report.run_report_from_args),
        ("bench-train", "training tokens/s per attention pattern (short real runs)",
         train_bench.add_arguments, train_bench.run_from_args),
        ("drift", "per-layer attention/MLP weight drift of checkpoints from their AR model", add_drift_arguments, run_drift),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Block-diffusion LMs from pretrained AR models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in _commands():
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _split_overrides(args)
    func: Callable[[argparse.Namespace], object] = args.func
    if args.command != "train":  # weight-loading bars only clutter one-shot commands
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    return run_reporting_errors(lambda: func(args))


def run_reporting_errors(func: Callable[[], object]) -> int:
    """Exit status of `func()`: 0, or 2 after printing a ConfigError as one `error: ...` line on stderr."""
    try:
        func()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
