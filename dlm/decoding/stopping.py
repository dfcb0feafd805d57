"""When a row is done (EOS, stop strings), how its tokens are cut, and the input checks every
decoder shares."""

from __future__ import annotations

import bisect
from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from dlm.decoding.output import GenerationOutput
from dlm.settings.errors import ConfigError


class Stopper:
    """Which rows have finished: EOS inside a completed block, or a stop string in the decoded
    text."""

    def __init__(self, eos_token_id: int | Sequence[int] | None, stop: Sequence[str] | None,
                 tokenizer, device):
        ids = ([] if eos_token_id is None
               else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos = torch.tensor(ids, dtype=torch.long, device=device)
        self.eos_ids = frozenset(ids)
        self.stop, self.tokenizer = list(stop or []), tokenizer

    @property
    def active(self) -> bool:
        """Whether anything can end a row before the length limit."""
        return bool(self.eos.numel() or self.stop)

    def done_in_block(self, seq: Tensor, block: list[list[int]], masked: list[list[bool]] | None,
                      start: int, prompt_len: int) -> list[bool]:
        """Per row: EOS committed in `block` (the host copy of `seq[:, start:start + W]`, fetched
        with the pass's one sync) with nothing masked before it (`masked`; None: nothing is), or a
        stop string in the committed text. Tokens up to such an EOS can no longer change: the row
        may stop there. On the host: a handful of list lookups instead of eight tensor ops a
        pass."""
        firsts = [len(row) if masked is None
                  else next((c for c, m in enumerate(masked[k]) if m), len(row))
                  for k, row in enumerate(block)]
        # the text, only where stop strings were asked for
        rows = seq.tolist() if self.stop else [None] * len(block)
        return [self.ends(row[:first], None if full is None else full[prompt_len:start + first])
                for row, first, full in zip(block, firsts, rows)]

    def ends(self, new: Sequence[int], generated: list[int] | None) -> bool:
        """Whether a row's `new` committed tokens end it: an EOS among them, or a stop string in the
        text of everything it `generated` so far (None: no stop strings to look for)."""
        if any(t in self.eos_ids for t in new):
            return True
        text = self.tokenizer.decode(generated) if self.stop else ""
        return any(s in text for s in self.stop)

    def update(self, finished: Tensor, generated: Tensor) -> Tensor:
        """`generated` `(B, N)`: everything decoded so far; returns the new `finished` `(B,)`."""
        finished = finished | torch.isin(generated, self.eos).any(dim=1)
        # text check, once per block, only where stop strings were asked for
        if self.stop:
            texts = self.tokenizer.batch_decode(generated.tolist())
            stopped = [any(s in t for s in self.stop) for t in texts]
            finished = finished | torch.tensor(stopped, device=finished.device)
        return finished

    def truncate(self, tokens: list[int]) -> list[int]:
        """Cut after the first EOS (kept), then before the token where the first stop string
        starts."""
        through_eos = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
        tokens = tokens[:through_eos]
        return self._cut_stop(tokens) if self.stop else tokens

    def _cut_stop(self, tokens: list[int]) -> list[int]:
        decode = self.tokenizer.decode
        has_stop = lambda n: any(s in decode(tokens[:n]) for s in self.stop)  # noqa: E731
        # fewest tokens showing a stop
        first = bisect.bisect_left(range(len(tokens) + 1), True, key=has_stop)
        if first > len(tokens):
            return tokens
        text = decode(tokens[:first])
        head = text[: min(text.find(s) for s in self.stop if s in text)]
        # a stop string may span tokens: drop back until no part of it is left
        n = first - 1
        while n > 0 and not head.startswith(decode(tokens[:n])):
            n -= 1
        return tokens[:n]

    def output(self, generated: Tensor | list[list[int]], nfe: int,
               row_forwards: list[int] | None = None) -> GenerationOutput:
        """Cut every row; `generated` is each row's ids through the block it stopped in."""
        raw = generated.tolist() if isinstance(generated, Tensor) else generated
        tokens = [self.truncate(row) for row in raw]
        return GenerationOutput(tokens=tokens, nfe=nfe, num_generated=[len(t) for t in tokens],
                                row_forwards=row_forwards or [nfe] * len(tokens),
                                raw_lengths=[len(r) for r in raw])


def check_inputs(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                 max_new_tokens: int, stop: Sequence[str] | None, tokenizer) -> None:
    """One-line errors for inputs the decoder cannot serve, before any forward."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ConfigError(f"input_ids{tuple(input_ids.shape)}: must be (batch, prompt_length) "
                          "with an attention_mask of the same shape")
    if not bool((attention_mask.diff(dim=1) >= 0).all() and attention_mask[:, -1].all()):
        raise ConfigError("attention_mask: prompts must be left-padded (pads first) "
                          "with at least one real token per row")
    longest = int(attention_mask.sum(dim=1).max())
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"decode.max_new_tokens={max_new_tokens}: prompt length {longest} + "
                          f"{max_new_tokens} = {longest + max_new_tokens} exceeds "
                          f"model.config.max_position_embeddings={limit}")
    if stop and tokenizer is None:
        raise ConfigError(f"stop={list(stop)!r}: stop strings need the tokenizer (tokenizer=...)")
