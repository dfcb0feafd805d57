"""The AR baseline: transformers' own greedy `generate` with its KV cache under the causal mask."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlm.decoding.output import GenerationOutput
from dlm.decoding.stopping import Stopper, check_inputs
from dlm.settings.errors import check_positive_int


def ar_generate(model: PreTrainedModel, input_ids: Tensor, *, attention_mask: Tensor | None = None, max_new_tokens: int,
                eos_token_id: int | Sequence[int] | None = None, stop: Sequence[str] | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None) -> GenerationOutput:
    """The AR baseline: transformers' own greedy `generate` with its KV cache under the causal mask.

    Same inputs and output as :func:`generate`; `nfe` is the number of decode steps (one token each).
    `eos_token_id=None` means no EOS stop here too (not the model's `generation_config` EOS).
    """
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    check_positive_int("decode.max_new_tokens", max_new_tokens)
    check_inputs(model, input_ids, attention_mask, max_new_tokens, stop, tokenizer)
    stopper = Stopper(eos_token_id, stop, tokenizer, input_ids.device)
    eos = stopper.eos.tolist()
    pad = eos[0] if eos else (model.generation_config.pad_token_id or 0)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, eos_token_id=eos, pad_token_id=pad,
                             stop_strings=list(stop) if stop else None, tokenizer=tokenizer)
    generated = out[:, input_ids.shape[1]:]
    return stopper.output(generated, nfe=generated.shape[1])
