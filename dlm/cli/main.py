"""`dlm` command line: one table of subcommands; parsing here, work in the library.

Bad input (a ConfigError) prints one `error: ...` line and exits 2, before any compute starts.
Any other exception also ends in one `error: ...` line (exit 1); `--debug` or `DLM_DEBUG=1` shows
its traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple, Sequence

from dlm.cli import commands as c
from dlm.settings import ConfigError


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]


COMMANDS = [
    Command("attention-demo", "print the attention patterns for a small sequence",
            c.add_demo, c.run_demo),
    Command("config", "print the resolved, validated experiment config",
            c.add_configs, c.run_config),
    Command("train", "train (AR pretraining or AR-to-dLM conversion) from an experiment config",
            c.add_configs, c.run_train),
    Command("generate",
            "complete prompts with a dlm checkpoint (cached parallel decoding) or an AR model",
            c.add_generate, c.run_generate),
    Command("import",
            "write a GGUF file, HF folder or hub id once as a plain HF folder (an AR checkpoint)",
            c.add_import, c.run_import),
    Command("average",
            "the uniform weight average of checkpoints of one lineage (LAWA, model soups)",
            c.add_average, c.run_average),
    Command("distill",
            "a teacher's greedy completions of a prompt file as training rows (JSONL)",
            c.add_distill, c.run_distill),
    Command("exactness", ("fast decoders vs their references on real prompts: "
                          "cache, batch, speculative; near-ties"),
            c.add_exactness, c.run_exactness),
    Command("bench", "tokens/s, TPF, NFE vs the AR baseline; table, JSON, Pareto plot",
            c.add_bench, c.run_bench),
    Command("eval",
            "evaluate a checkpoint with lm-eval (gsm8k, mmlu, gsm8k_synthetic; offline variants)",
            c.add_eval, c.run_eval),
    Command("sweep",
            "run a sweep: every point trained, benchmarked and evaluated in a nested MLflow run",
            c.add_sweep, c.run_sweep),
    Command("report", "a sweep's summary table and figures, read back from MLflow",
            c.add_report, c.run_report),
    Command("bench-train", "training tokens/s per attention pattern (short real runs)",
            c.add_bench_train, c.run_bench_train),
    Command("plan",
            "memory per GPU, FLOPs/token and wall time of a config on the meta device; fits or not",
            c.add_plan, c.run_plan),
    Command("drift", "per-layer attention/MLP weight drift of checkpoints from their AR model",
            c.add_drift, c.run_drift),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm",
                                     description="Block-diffusion LMs from pretrained AR models.")
    debug_default = os.environ.get("DLM_DEBUG", "") not in ("", "0")
    parser.add_argument("--debug", action="store_true", default=debug_default,
                        help="show the traceback of an unexpected error (also: DLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "train":  # weight-loading bars only clutter one-shot commands
        _quiet_progress_bars()
    return run_reporting_errors(lambda: args.func(args), debug=args.debug)


def _quiet_progress_bars() -> None:
    """Through the environment while transformers is not imported yet: importing it here would cost
    a second before the first one-line input error could be printed."""
    if "transformers" in sys.modules:
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_reporting_errors(func: Callable[[], object], *, debug: bool = False) -> int:
    """Exit status of `func()`: its own int status, else 0; 2 after printing a ConfigError as one
    `error: ...` line on stderr; 1 after any other exception, also in one line (re-raised with its
    traceback under `debug`)."""
    try:
        status = func()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        text = " ".join(str(err).split())[:500]
        print(f"error: unexpected {type(err).__name__}: {text} "
              "(the traceback: --debug or DLM_DEBUG=1)", file=sys.stderr)
        return 1
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
