"""Per-block noise for masked diffusion: the rate t, which tokens to mask, the complementary copy.

Sequence length L (``seq_len``), block size L' (``block_size``), ``nb = L // L'`` blocks. Each block
gets its own rate ``t ~ U[eps, 1]`` and exactly ``k = round(t * n)`` of its ``n`` eligible tokens
are masked, drawn without replacement (docs/design.md §1):
- ``uniform``: every eligible subset of size k is equally likely;
- ``position``: in proportion to ``w_i(t) = exp(beta * (1 - t) * i)`` (Efficient-DLM's
  position-dependent masking), by Gumbel-top-k. ``beta = ln2 / (half_life * L')``, so at t = 0 the
  weight doubles every ``half_life * L'`` positions; later tokens are masked more, matching
  left-to-right decoding.

Rounding is ``torch.round`` everywhere: round half to even (``round(2.5) = 2``, ``round(3.5) = 4``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from dlm.settings import STRATEGIES, ConfigError, check
from dlm.settings.errors import check_block_size

MAX_BETA = 1e30
"""Cap on beta: keeps log w finite (an infinite beta gives inf * 0 = NaN at position 0). Any beta
this large already orders the positions deterministically."""


class MaskSample(NamedTuple):
    """One draw of per-block noise for a batch."""

    mask: Tensor  # (B, L) bool, True = replaced by [MASK]
    t: Tensor  # (B, nb) float, the block's masking rate
    num_masked: Tensor  # (B, nb) long, k: masked tokens per block
    num_eligible: Tensor  # (B, nb) long, n: tokens per block that may be masked


def check_masking(seq_len: int, block_size: int, strategy: str, half_life: float) -> None:
    """The config rules this module depends on, in the config's one-line error form."""
    check(strategy in STRATEGIES, "masking.strategy", strategy, "unknown strategy", STRATEGIES)
    check_block_size(block_size, seq_len)
    _check_half_life(half_life)


def _check_half_life(half_life: float) -> None:
    if not half_life > 0:  # also rejects NaN
        raise ConfigError(f"masking.half_life={half_life!r}: must be > 0 (large = uniform)")


def sample_t(
    batch_size: int,
    num_blocks: int,
    *,
    eps: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-block rates ``t ~ U[eps, 1]``, shape (B, nb). eps keeps t away from 0 (BD3-LM, MDLM)."""
    u = torch.rand(batch_size, num_blocks, generator=generator, device=device)
    return eps + (1.0 - eps) * u


def position_log_weights(t: Tensor, block_size: int, half_life: float) -> Tensor:
    """``log w_i = beta * (1 - t) * i`` for i in 0..L'-1, shape (B, nb, L').

    ``beta = ln2 / (half_life * L')`` (paper: half_life = 0.1). ``half_life = inf`` gives beta = 0,
    all weights equal (uniform); a tiny half_life makes the rightmost positions win every draw.
    """
    _check_half_life(half_life)
    beta = min(math.log(2.0) / (half_life * block_size), MAX_BETA)
    i = torch.arange(block_size, device=t.device, dtype=t.dtype)
    return (beta * (1.0 - t)).unsqueeze(-1) * i  # (B, nb, 1) * (L',) -> (B, nb, L')


def _gumbel(
    shape: torch.Size,
    generator: Optional[torch.Generator],
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    # torch.rand is in [0, 1): clamp away 0 so -log(-log(u)) stays finite.
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp_min(tiny)
    return -torch.log(-torch.log(u))


def _top_k_per_block(keys: Tensor, k: Tensor) -> Tensor:
    """Bool (B, nb, L'): True at the k[b, j] largest keys of each block (k varies per block)."""
    order = keys.argsort(dim=-1, descending=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(keys.shape[-1], device=keys.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return ranks < k.unsqueeze(-1)


def sample_mask(
    batch_size: int,
    seq_len: int,
    block_size: int,
    strategy: str,
    half_life: float = 0.1,
    t: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    *,
    eligible: Optional[Tensor] = None,
    eps: float = 1e-3,
    device: torch.device | str | None = None,
) -> MaskSample:
    """Mask exactly ``k = round(t * n)`` eligible tokens in every block.

    `eligible` (B, L) bool marks tokens that may be noised (SFT: the response only); None = all.
    `t` (B, nb) is drawn from U[eps, 1] when not given. Uniform and position strategies both run as
    Gumbel-top-k over ``log w + Gumbel`` (log w = 0 for uniform), which samples without replacement
    in proportion to w; ineligible positions get -inf and are never picked because k <= n.
    """
    check_masking(seq_len, block_size, strategy, half_life)
    num_blocks = seq_len // block_size
    if eligible is None:
        eligible = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    elif eligible.shape != (batch_size, seq_len) or eligible.dtype != torch.bool:
        raise ValueError(f"eligible.shape={tuple(eligible.shape)}: "
                         f"must be bool ({batch_size}, {seq_len})")
    device = eligible.device
    if t is None:
        t = sample_t(batch_size, num_blocks, eps=eps, generator=generator, device=device)
    elif t.shape != (batch_size, num_blocks):
        raise ValueError(f"t.shape={tuple(t.shape)}: "
                         f"must be (batch_size, num_blocks)=({batch_size}, {num_blocks})")
    t = t.to(device)
    # keys in >= float32 even for a bf16 t
    rate = t.to(torch.promote_types(t.dtype, torch.float32))

    blocks = eligible.view(batch_size, num_blocks, block_size)  # (B, nb, L')
    num_eligible = blocks.sum(-1)
    num_masked = torch.round(rate * num_eligible).long().clamp(min=0).minimum(num_eligible)

    keys = _gumbel(blocks.shape, generator, device, rate.dtype)
    if strategy == "position":
        keys = keys + position_log_weights(rate, block_size, half_life)
    keys = keys.masked_fill(~blocks, -math.inf)
    mask = _top_k_per_block(keys, num_masked) & blocks
    return MaskSample(mask.view(batch_size, seq_len), t, num_masked, num_eligible)


def complementary(sample: MaskSample, eligible: Optional[Tensor] = None) -> MaskSample:
    """The Fast-dLLM v2 complementary copy: mask the eligible tokens `sample` left visible.

    The two copies together supervise every eligible token exactly once. ``t' = 1 - t`` is the
    nominal complementary rate; the realised count is exact, ``k' = n - k`` (it can differ from
    ``round(t' * n)`` by one at a rounding tie), so weight the loss by `num_masked`, not by t.
    """
    if eligible is None:
        eligible = torch.ones_like(sample.mask)
    elif eligible.shape != sample.mask.shape:
        raise ValueError(f"eligible.shape={tuple(eligible.shape)}: "
                         f"must match mask.shape={tuple(sample.mask.shape)}")
    return MaskSample(
        mask=eligible & ~sample.mask,
        t=1.0 - sample.t,
        num_masked=sample.num_eligible - sample.num_masked,
        num_eligible=sample.num_eligible,
    )
