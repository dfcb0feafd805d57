"""`dlm-lm-eval`: lm-eval's own CLI with the `dlm` model registered beside the built-ins, and a bad `dlm`
model argument failing in one `error:` line. The full console-script run: tests/evaluation/test_evaluate.py."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from dlm.cli.lm_eval import main, register

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lm_eval_logging():
    """lm-eval's CLI attaches a handler to the `lm_eval` logger once per process, bound to the stream that is
    sys.stderr then (capsys's here); put the logger back as it was so later modules do not write to it."""
    import lm_eval.utils

    logger = logging.getLogger("lm_eval")
    before = (list(logger.handlers), logger.propagate, logger.level, lm_eval.utils._LOGGING_CONFIGURED)
    yield
    logger.handlers[:], logger.propagate = before[0], before[1]
    logger.setLevel(before[2])
    lm_eval.utils._LOGGING_CONFIGURED = before[3]


def test_register_makes_dlm_resolvable_and_keeps_the_built_in_models():
    register()
    from lm_eval.api.registry import get_model, model_registry

    from dlm.evaluation.lm_eval_model import DLMEvalModel

    assert get_model("dlm") is DLMEvalModel
    assert "hf" in model_registry and "dlm" in model_registry.keys()


@pytest.mark.slow  # ~30 s: lm-eval's CLI indexes its ~15k built-in tasks before it builds the model
def test_a_bad_dlm_model_arg_is_one_error_line_and_exit_2(monkeypatch, capsys, lm_eval_logging):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["dlm-lm-eval", "--model", "dlm", "--model_args",
                                      "pretrained=/nonexistent/ckpt,treshold=0.9", "--tasks", "gsm8k_synthetic",
                                      "--include_path", "evals"])
    assert main() == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == [
        "error: model_args.treshold=0.9: unknown key (did you mean 'threshold'?); allowed: pretrained, batch_size, "
        "max_batch_size, device, dtype, max_length, loglikelihood, mc_num, seed, mode, block_size, threshold, "
        "max_new_tokens, sub_block_size, temperature, top_p, policy, factor, tokens_per_pass, one_token_per_forward, "
        "use_cache, cache, early_exit, compile, speculative_form, speculative_branches, gen_length"]
    assert "Traceback" not in err


def test_a_diffusion_checkpoint_given_to_the_stock_hf_model_gets_a_warning(tmp_path):
    from dlm.cli.lm_eval import diffusion_checkpoint_for_hf

    for pattern in ("block_clean", "causal"):
        (tmp_path / pattern).mkdir()
        (tmp_path / pattern / "dlm.yaml").write_text(
            f"pattern: {pattern}\nblock_size: 4\nmask_token: '<|mask|>'\nmask_token_id: 1\n")
    warning = diffusion_checkpoint_for_hf(["--model", "hf", "--model_args", f"pretrained={tmp_path / 'block_clean'}",
                                           "--tasks", "mmlu_local"])
    assert warning.startswith(f"--model hf with pretrained={tmp_path / 'block_clean'}: a dlm block_clean checkpoint")
    assert "Use --model dlm" in warning
    assert diffusion_checkpoint_for_hf(["--model", "hf", "--model_args", f"pretrained={tmp_path / 'causal'}"]) is None
    assert diffusion_checkpoint_for_hf(["--model", "dlm", "--model_args", f"pretrained={tmp_path / 'block_clean'}"]) \
        is None
    assert diffusion_checkpoint_for_hf(["--model", "hf", "--model_args", "pretrained=Qwen/Qwen2.5-0.5B"]) is None
