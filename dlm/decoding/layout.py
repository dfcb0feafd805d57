"""Where every token of a decode sits: per-row positions, block ids and realness, and the masks they give.

Prompts are left-padded, so every row starts generating at index P. Each row's tokens get the positions
and block ids they would have alone: real prompt tokens are at positions 0..p_len-1 (block
pos // block_size); generated block g sits at block ceil(p_len / block_size) + g, positions p_len + ...
Hence batched decoding gives the same tokens as one prompt at a time (Fast-dLLM issue #39). Block size 1
makes the mask token-causal: the AR mode's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.tensor.attention import block_causal


@dataclass
class Layout:
    """The whole planned sequence `(B, P + max_new_tokens)` of one generate call."""

    position_ids: Tensor  # (B, T) long
    block_ids: Tensor  # (B, T) long
    real: Tensor  # (B, T) bool, False = left padding
    prompt_len: int  # P, the padded prompt length; generation starts here in every row

    @classmethod
    def build(cls, attention_mask: Tensor, max_new_tokens: int, block_size: int) -> "Layout":
        real = attention_mask.bool()
        prompt_len = real.sum(dim=1, keepdim=True)  # (B, 1)
        prompt_pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding: 0..p_len-1, pads 0
        offset = torch.arange(max_new_tokens, device=real.device)[None, :]
        gen_pos = prompt_len + offset
        gen_block = -(-prompt_len // block_size) + offset // block_size  # ceil(p_len / block_size) + g
        return cls(position_ids=torch.cat([prompt_pos, gen_pos], dim=1),
                   block_ids=torch.cat([prompt_pos // block_size, gen_block], dim=1),
                   real=torch.cat([real, torch.ones_like(gen_pos, dtype=torch.bool)], dim=1),
                   prompt_len=real.shape[1])

    @property
    def total(self) -> int:
        return self.real.shape[1]

    def mask(self, start: int, end: int, keys: int) -> Tensor:
        """`(B, 1, end - start, keys)` bool: queries `start:end` over keys `:keys` (cache + input).

        A real query sees real keys of its own or earlier blocks; a pad query sees only itself, so no
        softmax row is empty (NaN) and pads never leak into real tokens. Keys past `end` belong to later
        blocks, so a static cache's unwritten slots are never seen.
        """
        q_real = self.real[:, start:end, None]
        sees = block_causal(self.block_ids[:, start:end, None], self.block_ids[:, None, :keys])
        sees = sees & self.real[:, None, :keys]
        q = torch.arange(start, end, device=self.real.device)
        itself = q[:, None] == torch.arange(keys, device=self.real.device)[None, :]
        return torch.where(q_real, sees, itself)[:, None]

    def select(self, rows: Tensor) -> "Layout":
        """The layout of the kept `rows` (finished rows leave the batch)."""
        return Layout(self.position_ids[rows], self.block_ids[rows], self.real[rows], self.prompt_len)
