"""`dlm` command line: parses arguments and calls library functions, nothing else.

Bad input (a ConfigError) prints one `error: ...` line and exits 2, before any compute starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from dlm.config import PATTERNS, ConfigError


def _attention_demo(args: argparse.Namespace) -> None:
    from dlm.attention import describe

    for pattern in args.patterns or PATTERNS:
        print(describe(pattern, args.seq_len, args.block_size), end="\n\n")


def _config(args: argparse.Namespace) -> None:
    from dlm.config import load_config, to_yaml

    print(to_yaml(load_config(*args.configs, overrides=args.overrides)), end="")


def _train(args: argparse.Namespace) -> None:
    from dlm.config import load_config
    from dlm.train import train

    result = train(load_config(*args.configs, overrides=args.overrides))
    print(f"final checkpoint: {result.final_dir}")
    print(f"mlflow run: {result.run_id} ({result.tracking_uri}); browse with: mlflow ui --backend-store-uri {result.tracking_uri}")
    for key in sorted(k for k in result.metrics if k.startswith(("val/", "train/loss"))):
        print(f"{key}: {result.metrics[key]:.4f}")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml [key=value ...]",
                   help="experiment YAML files, then dotlist overrides such as attention.block_size=32")


def _split_overrides(args: argparse.Namespace) -> None:
    """argparse cannot tell `a.yaml` from `k=v` in one nargs list; split them here."""
    if hasattr(args, "configs"):
        items = args.configs
        args.configs = [c for c in items if "=" not in c]
        args.overrides = [c for c in items if "=" in c]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Block-diffusion LMs from pretrained AR models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("attention-demo", help="print the attention patterns for a small sequence")
    demo.add_argument("--seq-len", type=int, default=8)
    demo.add_argument("--block-size", type=int, default=4)
    demo.add_argument("--patterns", nargs="*", choices=PATTERNS)
    demo.set_defaults(func=_attention_demo)

    cfg = sub.add_parser("config", help="print the resolved, validated experiment config")
    _add_config_args(cfg)
    cfg.set_defaults(func=_config)

    train = sub.add_parser("train", help="train (AR pretraining or AR-to-dLM conversion) from an experiment config")
    _add_config_args(train)
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _split_overrides(args)
    func: Callable[[argparse.Namespace], object] = args.func
    try:
        func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
