from __future__ import annotations

import math
import re
from collections import defaultdict

import pytest
import torch
from torch.testing import assert_close

from dlm.settings import ConfigError
from dlm.tensor.masking import MaskSample, complementary, position_log_weights, sample_mask, sample_t

T, F = True, False
N_SAMPLES = 20_000
TOL = 0.015  # ~4 standard errors of a rate estimated from N_SAMPLES draws (sd <= sqrt(0.25 / 20000) = 0.0035)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_eligible(batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.rand(batch_size, seq_len, generator=gen(seed)) < 0.6


def exact_inclusion(weights: list[float], k: int) -> list[float]:
    """P(position i among the first k drawn), drawing without replacement in proportion to `weights`.

    Enumerates the drawn set after each draw (dynamic programme over subsets as bitmasks); Gumbel-top-k
    has exactly this distribution, so it is an independent reference for sample_mask.
    """
    n, total = len(weights), sum(weights)
    layer = {0: 1.0}
    for _ in range(k):
        nxt: dict[int, float] = defaultdict(float)
        for drawn, p in layer.items():
            left = total - sum(w for j, w in enumerate(weights) if drawn >> j & 1)
            for j, w in enumerate(weights):
                if not drawn >> j & 1:
                    nxt[drawn | 1 << j] += p * w / left
        layer = nxt
    return [sum(p for drawn, p in layer.items() if drawn >> i & 1) for i in range(n)]


def mask_rates(strategy: str, half_life: float, t: float, block_size: int = 8, seed: int = 1) -> torch.Tensor:
    """Empirical per-position mask rate over N_SAMPLES one-block draws at a fixed t."""
    s = sample_mask(N_SAMPLES, block_size, block_size, strategy, half_life, t=torch.full((N_SAMPLES, 1), t),
                    generator=gen(seed))
    return s.mask.float().mean(0)


def test_sample_t_range_shape_and_seed():
    t = sample_t(500, 4, eps=0.1, generator=gen(3))
    assert t.shape == (500, 4)
    assert t.min() >= 0.1 and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.55, abs=0.02)
    assert torch.equal(t, sample_t(500, 4, eps=0.1, generator=gen(3)))


def test_position_log_weights_literal():
    # block 4, half_life 0.25 -> beta = ln2 / (0.25 * 4) = ln2: at t = 0 the weight doubles every position
    t = torch.tensor([[0.0, 0.5, 1.0]])
    w = position_log_weights(t, 4, 0.25).exp()
    r = math.sqrt(2)
    assert_close(w, torch.tensor([[[1.0, 2.0, 4.0, 8.0], [1.0, r, 2.0, 2 * r], [1.0, 1.0, 1.0, 1.0]]]))


@pytest.mark.parametrize("half_life", [float("inf"), 1e9, 1e-300])
def test_position_log_weights_extreme_half_life_is_finite(half_life):
    log_w = position_log_weights(torch.tensor([[0.0, 0.3]]), 8, half_life)
    assert torch.isfinite(log_w).all()
    if half_life > 1:
        assert log_w.abs().max() < 1e-7  # uniform
    else:
        assert (log_w[..., 1:] > log_w[..., :-1]).all()  # strictly increasing: rightmost wins


def test_literal_case_l4_block2():
    # half_life -> 0 makes position masking deterministic: block 0 (t=1) all masked, block 1 (t=0.5) its last token
    s = sample_mask(1, 4, 2, "position", 1e-4, t=torch.tensor([[1.0, 0.5]]), generator=gen())
    assert s.mask.tolist() == [[T, T, F, T]]
    assert s.num_masked.tolist() == [[2, 1]] and s.num_eligible.tolist() == [[2, 2]]
    c = complementary(s)
    assert c.mask.tolist() == [[F, F, T, F]]
    assert c.num_masked.tolist() == [[0, 1]] and c.num_eligible.tolist() == [[2, 2]]
    assert_close(c.t, torch.tensor([[0.0, 0.5]]))
    # only response tokens (positions 1..3) eligible: block 0 has n = 1
    eligible = torch.tensor([[F, T, T, T]])
    s = sample_mask(1, 4, 2, "position", 1e-4, t=torch.tensor([[1.0, 0.5]]), generator=gen(), eligible=eligible)
    assert s.mask.tolist() == [[F, T, F, T]] and s.num_eligible.tolist() == [[1, 2]]
    assert complementary(s, eligible).mask.tolist() == [[F, F, T, F]]


@pytest.mark.parametrize("strategy", ["uniform", "position"])
@pytest.mark.parametrize("with_eligible", [False, True])
def test_exactly_round_t_n_masked_per_block(strategy, with_eligible):
    batch_size, seq_len, block_size = 64, 32, 8
    eligible = random_eligible(batch_size, seq_len, seed=5) if with_eligible else None
    s = sample_mask(batch_size, seq_len, block_size, strategy, 0.1, generator=gen(6), eligible=eligible)
    blocks = s.mask.view(batch_size, -1, block_size)
    n = (eligible if with_eligible else torch.ones_like(s.mask)).view(batch_size, -1, block_size).sum(-1)
    assert torch.equal(s.num_eligible, n)
    assert torch.equal(s.num_masked, torch.round(s.t * n).long())
    assert torch.equal(blocks.sum(-1), s.num_masked)
    if with_eligible:
        assert not (s.mask & ~eligible).any()
    assert s.num_masked.min() == 0 and (s.num_masked == n).any()  # the full range of k is exercised


def test_round_is_half_to_even():
    # t * 8 = 2.5 -> 2 and 3.5 -> 4 (torch.round), both exact in float32
    s = sample_mask(1, 16, 8, "uniform", t=torch.tensor([[5 / 16, 7 / 16]]), generator=gen())
    assert s.num_masked.tolist() == [[2, 4]]


def test_uniform_rates_are_flat():
    rates = mask_rates("uniform", 0.1, t=0.5)
    assert_close(rates, torch.full((8,), 0.5), atol=TOL, rtol=0)
    # random t, longer sequence, some tokens ineligible: every eligible position has the same rate
    eligible = torch.zeros(N_SAMPLES, 16, dtype=torch.bool)
    eligible[:, 3:] = True
    s = sample_mask(N_SAMPLES, 16, 8, "uniform", generator=gen(2), eligible=eligible)
    rates = s.mask.float().mean(0)
    assert (rates[:3] == 0).all()
    assert rates[3:8].max() - rates[3:8].min() < 2 * TOL and rates[8:].max() - rates[8:].min() < 2 * TOL


@pytest.mark.parametrize("t", [0.25, 0.5, 0.75])
def test_position_rates_match_exact_gumbel_top_k(t):
    block_size, half_life = 8, 0.1
    beta = math.log(2) / (half_life * block_size)
    k = round(t * block_size)
    expected = torch.tensor(exact_inclusion([math.exp(beta * (1 - t) * i) for i in range(block_size)], k))
    rates = mask_rates("position", half_life, t)
    assert_close(rates, expected, atol=TOL, rtol=0, check_dtype=False)
    assert (rates[1:] > rates[:-1]).all()  # later positions masked more
    # the test can tell the formula from a near miss: dropping the (1 - t) factor is far outside TOL
    no_t_factor = torch.tensor(exact_inclusion([math.exp(beta * i) for i in range(block_size)], k))
    assert (rates - no_t_factor).abs().max() > 5 * TOL


@pytest.mark.parametrize("half_life", [1e9, float("inf")])
def test_huge_half_life_is_uniform(half_life):
    assert_close(mask_rates("position", half_life, t=0.5), torch.full((8,), 0.5), atol=TOL, rtol=0)


@pytest.mark.parametrize("with_eligible", [False, True])
def test_tiny_half_life_masks_rightmost_k(with_eligible):
    batch_size, seq_len, block_size = 256, 32, 8
    eligible = torch.ones(batch_size, seq_len, dtype=torch.bool)
    if with_eligible:
        eligible = random_eligible(batch_size, seq_len, seed=7)
    s = sample_mask(batch_size, seq_len, block_size, "position", 1e-4, generator=gen(8), eligible=eligible)
    blocks = eligible.view(batch_size, -1, block_size)
    from_right = blocks.flip(-1).cumsum(-1).flip(-1)  # eligible tokens at or right of each position
    expected = blocks & (from_right <= s.num_masked.unsqueeze(-1))
    assert torch.equal(s.mask, expected.view(batch_size, seq_len))


@pytest.mark.parametrize("strategy", ["uniform", "position"])
def test_complementary_covers_every_eligible_token_once(strategy):
    batch_size, seq_len, block_size = 64, 32, 8
    eligible = random_eligible(batch_size, seq_len, seed=9)
    s = sample_mask(batch_size, seq_len, block_size, strategy, generator=gen(10), eligible=eligible)
    c = complementary(s, eligible)
    coverage = s.mask.long() + c.mask.long()
    assert torch.equal(coverage, eligible.long())  # eligible: exactly once; ineligible: never
    assert torch.equal(c.mask.view(batch_size, -1, block_size).sum(-1), c.num_masked)
    assert torch.equal(c.num_masked + s.num_masked, s.num_eligible)
    assert_close(c.t, 1 - s.t)


def test_given_t_is_used():
    t = torch.tensor([[0.0, 0.25, 0.5, 1.0]] * 3)
    s = sample_mask(3, 16, 4, "position", t=t, generator=gen())
    assert torch.equal(s.t, t)
    assert s.num_masked.tolist() == [[0, 1, 2, 4]] * 3
    with pytest.raises(ValueError, match=r"^t.shape=\(3, 3\): must be \(batch_size, num_blocks\)=\(3, 4\)$"):
        sample_mask(3, 16, 4, "position", t=t[:, :3])


def test_same_seed_same_mask():
    a = sample_mask(8, 32, 8, "position", generator=gen(11))
    b = sample_mask(8, 32, 8, "position", generator=gen(11))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert isinstance(a, MaskSample)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="random"), "masking.strategy='random': unknown strategy; allowed: uniform, position"),
        (dict(half_life=-1.0), "masking.half_life=-1.0: must be > 0 (large = uniform)"),
        (dict(half_life=0.0), "masking.half_life=0.0: must be > 0 (large = uniform)"),
        (dict(seq_len=10), "attention.block_size=4: must divide data.max_length=10; allowed: 1, 2, 5, 10"),
        (dict(block_size=0), "attention.block_size=0: must be a positive integer"),
    ],
)
def test_bad_config_raises_one_line(kwargs, message):
    args = dict(batch_size=2, seq_len=8, block_size=4, strategy="position", half_life=0.1) | kwargs
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        sample_mask(**args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    eligible = torch.ones(4, 32, dtype=torch.bool, device="cuda")
    s = sample_mask(4, 32, 8, "position", generator=g, eligible=eligible)
    assert s.mask.is_cuda and s.t.is_cuda
    assert torch.equal(s.mask.view(4, -1, 8).sum(-1), s.num_masked)
