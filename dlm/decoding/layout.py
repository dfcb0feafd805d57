"""Where every token of a decode sits: per-row positions, block ids and realness, and the masks they
give.

Prompts are left-padded, so every row starts generating at index P. Each row's tokens get the
positions and block ids they would have alone: real prompt tokens are at positions 0..p_len-1 (block
pos // block_size); generated block g sits at block ceil(p_len / block_size) + g, positions
p_len + ... Hence batched decoding gives the same tokens as one prompt at a time (Fast-dLLM issue
#39). The mask is the checkpoint's pattern's view (`Pattern.view`): committed tokens see each other
by its clean rule, the block being denoised sees itself and the committed tokens its noisy rule
allows, so a decode step is the training mask restricted to what the decode holds. The causal
pattern at block size 1 is the AR mode's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.tensor.patterns import Pattern, Slots


@dataclass
class Layout:
    """The whole planned sequence `(B, P + max_new_tokens)` of one generate call."""

    position_ids: Tensor  # (B, T) long
    block_ids: Tensor  # (B, T) long
    real: Tensor  # (B, T) bool, False = left padding
    prompt_len: int  # P, the padded prompt length; generation starts here in every row
    pattern: Pattern  # at the decode's block size

    @classmethod
    def build(cls, attention_mask: Tensor, max_new_tokens: int, pattern: Pattern) -> "Layout":
        real = attention_mask.bool()
        block_size = pattern.block_size
        prompt_len = real.sum(dim=1, keepdim=True)  # (B, 1)
        # left padding: 0..p_len-1, pads 0
        prompt_pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        offset = torch.arange(max_new_tokens, device=real.device)[None, :]
        gen_pos = prompt_len + offset
        # ceil(p_len / block_size) + g
        gen_block = -(-prompt_len // block_size) + offset // block_size
        return cls(position_ids=torch.cat([prompt_pos, gen_pos], dim=1),
                   block_ids=torch.cat([prompt_pos // block_size, gen_block], dim=1),
                   real=torch.cat([real, torch.ones_like(gen_pos, dtype=torch.bool)], dim=1),
                   prompt_len=real.shape[1], pattern=pattern)

    @property
    def total(self) -> int:
        return self.real.shape[1]

    def mask(self, start: int, end: int, keys: int, noisy: tuple[int, int] | None = None, *,
             group_width: int | None = None) -> Tensor:
        """`(B, 1, end - start, keys)` bool: queries `start:end` over keys `:keys` (cache + input);
        slots `noisy[0]:noisy[1]` are the block being denoised (one group; with `group_width`,
        consecutive groups of that many slots, each seeing only itself among the noisy slots), every
        other slot is committed.

        A real query sees real keys as the pattern's view allows; a pad query sees only itself, so
        no softmax row is empty (NaN) and pads never leak into real tokens. Keys of later blocks (a
        static cache's unwritten slots) are never seen: every pattern's decode rules are causal
        across blocks.
        """
        q, k = self._slots(start, end, noisy, group_width), self._slots(0, keys, noisy, group_width)
        q = Slots(*(t[:, :, None] for t in q))
        k = Slots(*(t[:, None, :] for t in k))
        sees = self.pattern.view(q, k) & self.real[:, None, :keys]
        itself = q.index == k.index
        return torch.where(self.real[:, start:end, None], sees, itself)[:, None]

    def _slots(self, lo: int, hi: int, noisy: tuple[int, int] | None,
               group_width: int | None = None) -> Slots:
        index = torch.arange(lo, hi, device=self.real.device).expand(self.real.shape[0], -1)
        if noisy is None:
            flag = torch.zeros_like(index, dtype=torch.bool)
            return Slots(index, self.block_ids[:, lo:hi], flag, flag.long())
        flag = (index >= noisy[0]) & (index < noisy[1])
        group = flag.long() if group_width is None else torch.where(
            flag, 1 + (index - noisy[0]) // group_width, 0)
        return Slots(index, self.block_ids[:, lo:hi], flag, group)

    def select(self, rows: Tensor) -> "Layout":
        """The layout of the kept `rows` (finished rows leave the batch)."""
        return Layout(self.position_ids[rows], self.block_ids[rows], self.real[rows],
                      self.prompt_len, self.pattern)
