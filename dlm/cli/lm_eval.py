"""`dlm-lm-eval` / `python -m dlm.cli.lm_eval`: lm-eval's own CLI with the `dlm` model registered.

lm-eval 0.4.13 discovers no plugin models (no entry-point group; `--include_path` loads tasks only),
so its stock `lm-eval` command cannot see `--model dlm`. This script imports the adapter (which
registers `dlm` after lm-eval's built-ins, so `--model hf` etc. still resolve) and hands every flag
to lm-eval unchanged:

    dlm-lm-eval --model dlm --model_args pretrained=outputs/tiny/final,threshold=0.9 \\
        --tasks gsm8k_local --include_path evals/ --limit 20
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from dlm.cli.main import run_reporting_errors

log = logging.getLogger("dlm")


def register() -> None:
    """Make `dlm` (and still every built-in model) resolvable in lm-eval's registry."""
    import dlm.evaluation.lm_eval_model  # noqa: F401  -- registers on import


def diffusion_checkpoint_for_hf(argv: Sequence[str]) -> str | None:
    """The warning for `--model hf` on a dlm diffusion checkpoint
    (the stock class scores it causally), else None."""
    args = list(argv)
    model = args[args.index("--model") + 1] if "--model" in args[:-1] else None
    model_args = args[args.index("--model_args") + 1] if "--model_args" in args[:-1] else ""
    pretrained = next((kv.split("=", 1)[1] for kv in model_args.split(",")
                       if kv.startswith("pretrained=")), None)
    if model != "hf" or pretrained is None or not (Path(pretrained) / "dlm.yaml").is_file():
        return None
    from dlm.models.checkpoint import read_meta

    pattern = read_meta(pretrained).attention_pattern
    if pattern.autoregressive:
        return None
    return (f"--model hf with pretrained={pretrained}: a dlm {pattern.name} checkpoint; "
            "the stock hf model scores it as a causal LM (left to right, no [MASK], no blocks). "
            "Use --model dlm to score it as it was trained.")


def main() -> int:
    """Run lm-eval's CLI on `sys.argv`; a ConfigError prints one `error: ...` line and exits 2."""
    warning = diffusion_checkpoint_for_hf(sys.argv[1:])
    if warning:
        logging.basicConfig()
        log.warning(warning)
    register()
    from lm_eval.__main__ import cli_evaluate

    return run_reporting_errors(cli_evaluate)


if __name__ == "__main__":
    sys.exit(main())
