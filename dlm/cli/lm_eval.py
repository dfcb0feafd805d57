"""`dlm-lm-eval` / `python -m dlm.cli.lm_eval`: lm-eval's own CLI with the `dlm` model registered.

lm-eval 0.4.13 discovers no plugin models (no entry-point group; `--include_path` loads tasks only),
so its stock `lm-eval` command cannot see `--model dlm`. This script imports the adapter (which
registers `dlm` after lm-eval's built-ins, so `--model hf` etc. still resolve) and hands every flag to
lm-eval unchanged:

    dlm-lm-eval --model dlm --model_args pretrained=outputs/tiny/final,threshold=0.9 \\
        --tasks gsm8k_local --include_path evals/ --limit 20
"""

from __future__ import annotations

import sys

from dlm.cli.main import run_reporting_errors


def register() -> None:
    """Make `dlm` (and still every built-in model) resolvable in lm-eval's registry."""
    import dlm.evaluation.lm_eval_model  # noqa: F401  -- registers on import


def main() -> int:
    """Run lm-eval's CLI on `sys.argv`; a ConfigError prints one `error: ...` line and exits 2."""
    register()
    from lm_eval.__main__ import cli_evaluate

    return run_reporting_errors(cli_evaluate)


if __name__ == "__main__":
    sys.exit(main())
