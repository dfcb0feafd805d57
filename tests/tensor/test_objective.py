from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dlm.settings import PATTERNS, ConfigError
from dlm.tensor import patterns
from dlm.tensor.objective import ar_loss, block_weights, diffusion_loss, predictions_for_targets, shift_valid

T, F_ = True, False
L, BS, V = 8, 4, 11


def P(name: str, block_size: int = BS) -> patterns.Pattern:
    return patterns.get(name, block_size=block_size)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def row_id_logits(pattern: str, batch_size: int = 2) -> torch.Tensor:
    """Logits whose channel 0 holds the row index, so the row a prediction came from is readable."""
    n = P(pattern).input_length(L)
    logits = torch.zeros(batch_size, n, V)
    logits[..., 0] = torch.arange(n, dtype=torch.float32)
    return logits


def source_of(pattern: str, shift: bool) -> list[int]:
    preds = predictions_for_targets(row_id_logits(pattern), pattern=P(pattern), seq_len=L, shift=shift)
    assert preds.shape == (2, L, V)
    return preds[0, :, 0].long().tolist()


def loss_for(logits, targets, mask, *, pattern="block_clean", shift=False, weights=None, eligible=None):
    weights = torch.ones(mask.shape) if weights is None else weights
    return diffusion_loss(logits, targets, mask, weights=weights, pattern=P(pattern), seq_len=mask.shape[1],
                          shift=shift, eligible=eligible)


def test_shift_valid():
    assert shift_valid(4, False).tolist() == [T, T, T, T]
    assert shift_valid(4, True).tolist() == [F_, T, T, T]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_no_shift_row_i_predicts_token_i(pattern):
    assert source_of(pattern, shift=False) == list(range(L))  # block_clean: the noisy half only


@pytest.mark.parametrize("pattern", ["causal", "bidirectional", "block"])
def test_shift_row_i_minus_1_predicts_token_i(pattern):
    assert source_of(pattern, shift=True)[1:] == list(range(L - 1))


def test_block_clean_shift_uses_clean_row_at_block_start():
    # L = 8, block 4: token 4 starts block 1 and comes from the clean row of token 3 (index L + 3 = 11);
    # token 0 has no prediction (placeholder, excluded by shift_valid)
    assert source_of("block_clean", shift=True)[1:] == [0, 1, 2, 11, 4, 5, 6]


def test_shift_excludes_position_zero_from_the_loss():
    logits = torch.randn(2, 2 * L, V, generator=gen(1))
    targets = torch.randint(V, (2, L), generator=gen(2))
    mask = torch.ones(2, L, dtype=torch.bool)
    out = loss_for(logits, targets, mask, shift=True)
    assert out.scored[:, 0].eq(False).all() and out.scored[:, 1:].all()
    assert (out.nll[:, 0] == 0).all()


def test_block_clean_loss_uses_only_the_noisy_half():
    logits = torch.randn(2, 2 * L, V, generator=gen(3))
    targets = torch.randint(V, (2, L), generator=gen(4))
    mask = torch.rand(2, L, generator=gen(5)) < 0.5
    mask[:, BS] = True  # a block start is masked, so the shifted loss reads a clean row
    other = logits.clone()
    other[:, L:] = torch.randn(2, L, V, generator=gen(6))
    assert torch.equal(loss_for(logits, targets, mask).loss, loss_for(other, targets, mask).loss)
    # with shift, the clean row before a block start does matter (the control that this test can fail)
    shifted = loss_for(logits, targets, mask, shift=True).loss
    assert not torch.equal(shifted, loss_for(other, targets, mask, shift=True).loss)


def test_block_weights_literal():
    num_masked = torch.tensor([[0, 2, 4]])
    num_eligible = torch.tensor([[4, 3, 4]])  # block 1: 2 masked of 3 eligible -> 3/2
    elbo = block_weights(num_masked, num_eligible, BS, "elbo")
    assert elbo.tolist() == [[0.0] * 4 + [1.5] * 4 + [1.0] * 4]
    none = block_weights(num_masked, num_eligible, BS, "none")
    assert none.tolist() == [[0.0] * 4 + [1.0] * 4 + [1.0] * 4]
    with pytest.raises(ConfigError, match=r"^objective.weighting='1/t': unknown weighting; allowed: elbo, none$"):
        block_weights(num_masked, num_eligible, BS, "1/t")


def test_block_with_nothing_masked_adds_nothing():
    logits = torch.randn(1, L, V, generator=gen(7))
    targets = torch.randint(V, (1, L), generator=gen(8))
    mask = torch.tensor([[F_, F_, F_, F_, T, F_, T, F_]])
    weights = block_weights(torch.tensor([[0, 2]]), torch.tensor([[4, 4]]), BS, "elbo")
    base = loss_for(logits, targets, mask, pattern="bidirectional", weights=weights)
    other = logits.clone()
    other[:, :BS] = torch.randn(1, BS, V, generator=gen(9))
    assert torch.equal(base.loss, loss_for(other, targets, mask, pattern="bidirectional", weights=weights).loss)
    # all blocks unmasked: zero loss, and backward still works
    logits.requires_grad_(True)
    empty = loss_for(logits, targets, torch.zeros(1, L, dtype=torch.bool), pattern="bidirectional", weights=weights)
    empty.loss.backward()
    assert empty.loss.item() == 0.0 and (logits.grad == 0).all() and not empty.scored.any()


def test_loss_matches_hand_computation():
    # L = 4, block 2, V = 3. Row logits [ln 2, 0, 0] give p = (1/2, 1/4, 1/4); [0, 0, 0] give 1/3 each.
    a, u = [math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]
    logits = torch.tensor([[a, u, a, u]])
    targets = torch.tensor([[0, 2, 1, 2]])
    mask = torch.tensor([[T, F_, T, T]])  # block 0: 1 of 2 masked (weight 2); block 1: 2 of 2 (weight 1)
    weights = block_weights(torch.tensor([[1, 2]]), torch.tensor([[2, 2]]), 2, "elbo")
    out = diffusion_loss(logits, targets, mask, weights=weights, pattern=P("block", 2), seq_len=4,
                         shift=False)
    nll = [math.log(2), 0.0, math.log(4), math.log(3)]
    assert_close(out.nll, torch.tensor([nll]))
    assert out.loss.item() == pytest.approx((2 * nll[0] + nll[2] + nll[3]) / 4)
    assert out.correct.tolist() == [[T, F_, F_, F_]]  # argmax 0 (ties at [0,0,0] resolve to 0 != target 2)
    # only 3 tokens eligible: same numerator, normalised by 3
    eligible = torch.tensor([[T, F_, T, T]])
    out = diffusion_loss(logits, targets, mask, weights=weights, pattern=P("block", 2), seq_len=4,
                         shift=False, eligible=eligible)
    assert out.loss.item() == pytest.approx((2 * nll[0] + nll[2] + nll[3]) / 3)


def _entropy(row: list[float], temperature: float = 1.0) -> float:
    z = [x / temperature for x in row]
    norm = math.log(sum(math.exp(x) for x in z))
    return -sum(math.exp(x - norm) * (x - norm) for x in z)


def test_certainty_is_the_mean_entropy_of_the_correctly_predicted_masked_rows():
    # L = 4, block 2, V = 3: rows 0 and 2 predict their targets (argmax 0 and 1), row 3 does not, row 1 is unmasked
    a, b, c, u = [2.0, 0.5, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0], [5.0, 0.0, 0.0]
    logits = torch.tensor([[a, u, b, c]])
    targets = torch.tensor([[0, 0, 1, 2]])
    mask = torch.tensor([[T, F_, T, T]])
    for temperature in (1.0, 0.5):
        out = diffusion_loss(logits, targets, mask, weights=torch.ones(1, 4), pattern=P("block", 2), seq_len=4,
                             shift=False, certainty_temperature=temperature)
        expected = (_entropy(a, temperature) + _entropy(b, temperature)) / 2
        assert out.certainty.item() == pytest.approx(expected, rel=1e-5)
        assert out.correct.tolist() == [[T, F_, T, F_]]
    assert loss_for(logits, targets, mask, pattern="block").certainty is None  # not asked: not computed


def test_certainty_is_zero_when_nothing_is_predicted_right_and_its_gradient_sharpens():
    logits = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.5, 0.0]]], requires_grad=True)
    wrong = diffusion_loss(logits, torch.tensor([[0, 0]]), torch.tensor([[T, T]]), weights=torch.ones(1, 2),
                           pattern=P("block", 2), seq_len=2, shift=False, certainty_temperature=1.0)
    assert wrong.certainty.item() == 0.0
    right = diffusion_loss(logits, torch.tensor([[1, 1]]), torch.tensor([[T, T]]), weights=torch.ones(1, 2),
                           pattern=P("block", 2), seq_len=2, shift=False, certainty_temperature=1.0)
    right.certainty.backward()
    # descending the entropy raises the top logit against the others on every correct row
    assert (logits.grad[0, :, 1] < 0).all() and (logits.grad[0, :, [0, 2]] > 0).all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shift", [False, True])
def test_loss_matches_dense_log_softmax_reference(pattern, shift):
    batch_size = 3
    logits = torch.randn(batch_size, P(pattern).input_length(L), V, generator=gen(10))
    targets = torch.randint(V, (batch_size, L), generator=gen(11))
    mask = torch.rand(batch_size, L, generator=gen(12)) < 0.6
    weights = torch.rand(batch_size, L, generator=gen(13)) * 3
    out = loss_for(logits, targets, mask, pattern=pattern, shift=shift, weights=weights)
    # reference: full log-softmax, rows picked by a Python loop over the rule stated in DESIGN.md §1
    logp = logits.log_softmax(-1)
    total = 0.0
    for b in range(batch_size):
        for i in range(L):
            if not mask[b, i] or (shift and i == 0):
                continue
            row = i if not shift else (L + i - 1 if patterns.get(pattern).two_halves and i % BS == 0 else i - 1)
            total += -weights[b, i] * logp[b, row, targets[b, i]]
    assert_close(out.loss, total / (batch_size * L))


def test_ar_loss_equals_cross_entropy():
    logits = torch.randn(2, L, V, generator=gen(14))
    targets = torch.randint(V, (2, L), generator=gen(15))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets[:, 1:].reshape(-1))
    out = ar_loss(logits, targets)
    assert_close(out.loss, expected)
    assert out.scored[:, 0].eq(False).all() and out.scored[:, 1:].all()
    # loss_mask indexes targets: score only the response (tokens 5..7)
    loss_mask = torch.zeros(2, L, dtype=torch.bool)
    loss_mask[:, 5:] = True
    ignored = targets.masked_fill(~loss_mask, -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), ignored[:, 1:].reshape(-1), ignore_index=-100)
    out = ar_loss(logits, targets, loss_mask)
    assert_close(out.loss, expected)
    assert torch.equal(out.scored, loss_mask)
    assert torch.equal(out.correct, loss_mask & (logits.argmax(-1).roll(1, dims=1) == targets))


def test_bf16_logits_give_the_float32_answer():
    logits = torch.randn(2, 2 * L, 1000, generator=gen(16)) * 4
    targets = torch.randint(1000, (2, L), generator=gen(17))
    mask = torch.rand(2, L, generator=gen(18)) < 0.7
    full = loss_for(logits, targets, mask, shift=True)
    half = loss_for(logits.bfloat16(), targets, mask, shift=True)
    assert half.loss.dtype == torch.float32 and half.nll.dtype == torch.float32
    assert_close(half.loss, full.loss, rtol=1e-2, atol=0)
    # the upcast is exact: bf16 input equals its own float32 copy bit for bit
    assert torch.equal(half.loss, loss_for(logits.bfloat16().float(), targets, mask, shift=True).loss)
    assert_close(ar_loss(logits[:, :L].bfloat16(), targets).loss, ar_loss(logits[:, :L], targets).loss,
                 rtol=1e-2, atol=0)


def test_gradient_reaches_only_the_predicting_rows():
    logits = torch.randn(1, 2 * L, V, generator=gen(19), requires_grad=True)
    targets = torch.randint(V, (1, L), generator=gen(20))
    mask = torch.tensor([[F_, F_, T, F_, T, F_, F_, F_]])
    loss_for(logits, targets, mask, shift=True).loss.backward()
    rows_with_grad = logits.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert rows_with_grad == [1, L + 3]  # token 2 <- noisy row 1; token 4 (block start) <- clean row 3


def test_bad_shapes_raise_one_line():
    logits = torch.zeros(2, L, V)
    msg = "logits.shape=(2, 8, 11): must be (B, 16, V) for pattern='block_clean', seq_len=8"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        predictions_for_targets(logits, pattern=P("block_clean"), seq_len=L, shift=False)
    with pytest.raises(ValueError, match=r"^mask.shape=\(2, 7\): must be \(B, L\)=\(2, 8\)$"):
        diffusion_loss(logits, torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L - 1, dtype=torch.bool),
                       weights=torch.ones(2, L), pattern=P("causal"), seq_len=L, shift=False)
    with pytest.raises(ConfigError, match=r"^attention.pattern='blok': unknown pattern"):
        predictions_for_targets(logits, pattern=P("blok"), seq_len=L, shift=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_bf16_logits():
    logits = torch.randn(2, 2 * L, V, generator=gen(21)).cuda()
    targets = torch.randint(V, (2, L), generator=gen(22)).cuda()
    mask = (torch.rand(2, L, generator=gen(23)) < 0.5).cuda()
    out = loss_for(logits.bfloat16(), targets, mask, shift=True, weights=torch.ones(2, L, device="cuda"))
    assert out.loss.is_cuda
    assert_close(out.loss.cpu(), loss_for(logits.cpu(), targets.cpu(), mask.cpu(), shift=True).loss, rtol=1e-2, atol=0)
