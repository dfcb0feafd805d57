"""AR decoding, two ways: the lean greedy loop of dlm's own engine (the AR baseline every speed-up
is measured against: same cache, same forwards, same compile) and transformers' own `generate`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlm.decoding.batch import ActiveRows
from dlm.decoding.output import GenerationOutput
from dlm.decoding.policies import without_mask
from dlm.decoding.runner import Runner
from dlm.decoding.stopping import Stopper, check_inputs
from dlm.settings.errors import check_positive_int


def ar_generate(model: PreTrainedModel, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                stop: Sequence[str] | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None) -> GenerationOutput:
    """The AR baseline: transformers' own greedy `generate` with its KV cache under the causal mask.

    Same inputs and output as :func:`generate`; `nfe` is the number of decode steps (one token
    each). `eos_token_id=None` means no EOS stop here too (not the model's `generation_config` EOS).
    """
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None
                      else attention_mask.to(input_ids.device))
    check_positive_int("decode.max_new_tokens", max_new_tokens)
    check_inputs(model, input_ids, attention_mask, max_new_tokens, stop, tokenizer)
    stopper = Stopper(eos_token_id, stop, tokenizer, input_ids.device)
    eos = stopper.eos.tolist()
    pad = eos[0] if eos else (model.generation_config.pad_token_id or 0)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=eos, pad_token_id=pad,
                             stop_strings=list(stop) if stop else None, tokenizer=tokenizer)
    generated = out[:, input_ids.shape[1]:]
    return stopper.output(generated, nfe=generated.shape[1])


def greedy_ar(run: Runner, input_ids: Tensor, max_new_tokens: int, stopper: Stopper,
              exclude: int | None = None) -> ActiveRows:
    """One argmax token per forward over `run`'s cache (a token-causal layout); rows leave at EOS.

    The prefill's last logit gives the first token, so `nfe` = tokens decoded, as for `generate`.
    `exclude` (the [MASK] id of a converted model) is never chosen.
    """
    prompt_len = input_ids.shape[1]
    room = input_ids.new_zeros(input_ids.shape[0], max_new_tokens)
    rows = ActiveRows(torch.cat([input_ids, room], dim=1), prompt_len)
    logits = run(rows.seq, 0, prompt_len, 1, first=True)[:, -1]
    for pos in range(prompt_len, prompt_len + max_new_tokens):
        allowed = logits if exclude is None else without_mask(logits, exclude)
        rows.seq[:, pos] = allowed.argmax(dim=-1)
        rows.count_forward()
        # the one sync per token, and only when something can end a row
        if stopper.active:
            finished = stopper.done_in_block(rows.seq, rows.seq[:, pos:pos + 1].tolist(), None,
                                             pos, prompt_len)
            if any(finished):
                run.select(rows.drop(finished, pos + 1))
        if not rows.active or pos + 1 == prompt_len + max_new_tokens:
            break
        logits = run(rows.seq, run.keep_until(pos), pos + 1, 1)[:, -1]
    rows.drop([True] * len(rows.ids), pos + 1)
    return rows
