"""The rows of a generate call that are still decoding, and what the finished ones produced.

A finished row leaves the batch at once (early exit), so the next forward costs only what the
unfinished rows cost; its tokens and the forwards it took part in are kept under its original
index.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ActiveRows:
    """`seq` `(B', T)` holds only the active rows; `ids[k]` is row k's index in the caller's
    batch."""

    def __init__(self, seq: Tensor, prompt_len: int):
        self.seq, self.prompt_len = seq, prompt_len
        self.ids = list(range(seq.shape[0]))
        # (B', V) logit predicting the current block's first token (shift)
        self.prev: Tensor | None = None
        # generated ids, through the last decoded block
        self.tokens: list[list[int]] = [[] for _ in self.ids]
        self.forwards = [0] * len(self.ids)
        self.nfe = 0  # forwards of the whole batch

    @property
    def active(self) -> bool:
        return bool(self.ids)

    def count_forward(self, rows: list[int] | None = None) -> None:
        """One forward of the batch, in which `rows` took part (positions in the active batch;
        None: all)."""
        self.nfe += 1
        for k in range(len(self.ids)) if rows is None else rows:
            self.forwards[self.ids[k]] += 1

    def drop(self, finished: list[bool], end: int, tokens: list[list[int]] | None = None) -> Tensor:
        """Record the finished rows' tokens `seq[:, P:end]` (or row k's `tokens[k]`, for a layout
        with holes), keep the rest; returns the kept row indices."""
        done = [k for k, f in enumerate(finished) if f]
        if done:
            got = ([tokens[k] for k in done] if tokens is not None
                   else self.seq[done, self.prompt_len:end].tolist())
            for k, row in zip(done, got):
                self.tokens[self.ids[k]] = row
        kept = [k for k, f in enumerate(finished) if not f]
        keep = torch.tensor(kept, dtype=torch.long, device=self.seq.device)
        if done:
            self.seq = self.seq[keep]
            self.prev = None if self.prev is None else self.prev[keep]
            self.ids = [self.ids[k] for k in keep.tolist()]
        return keep
