"""Losses: the masked-diffusion ELBO over the noisy sequence, and plain next-token cross-entropy.

Which logit row predicts token i depends on the attention pattern and `shift` (docs/design.md §1):
- no shift (LLaDA, the paper's choice): row i predicts token i;
- shift (Dream): row i-1 predicts token i, and token 0 has no prediction.
For a two-halves pattern (``block_clean``) the model sees ``x_t ⊕ x_0`` (2L rows) and only the noisy
half is scored; which row predicts each token is the pattern's (`Pattern.predicting_rows`).

Log-softmax runs in float32, on the scored rows only (V can be 150k, so a full (B, L, V) float32
copy is what we avoid).

The certainty term (dParallel's certainty forcing, Chen et al. 2025) is the mean entropy of the
temperature-scaled prediction over the masked tokens the model already gets right: minimising it
makes correct predictions confident sooner, which is what a confidence-threshold decoder commits on.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.settings import WEIGHTINGS, ConfigError
from dlm.tensor.patterns import Pattern


class LossOutput(NamedTuple):
    loss: Tensor  # () float32, the value to backpropagate
    nll: Tensor  # (B, L) float32, -log p(target) per token, 0 where not scored
    scored: Tensor  # (B, L) bool, positions that entered the loss
    correct: Tensor  # (B, L) bool, argmax == target at scored positions
    certainty: Optional[Tensor] = None  # () float32: entropy over the correct scored rows, if asked


def shift_valid(seq_len: int, shift: bool, *, device: torch.device | str | None = None) -> Tensor:
    """(L,) bool: positions that have a prediction; with shift, token 0 has none."""
    valid = torch.ones(seq_len, dtype=torch.bool, device=device)
    if shift:
        valid[0] = False
    return valid


def _check_logits(logits: Tensor, pattern: Pattern, seq_len: int) -> None:
    expected = pattern.input_length(seq_len)
    if logits.dim() != 3 or logits.shape[1] != expected:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: must be (B, {expected}, V) for "
                         f"pattern={pattern.name!r}, seq_len={seq_len}")


def predictions_for_targets(logits: Tensor, *, pattern: Pattern, seq_len: int,
                            shift: bool) -> Tensor:
    """(B, L, V): at index i, the logit row that predicts token i of the noisy sequence.

    `logits` is (B, L, V), or (B, 2L, V) for a two-halves pattern (noisy half first). A gathered
    copy: for inspection and tests; :func:`diffusion_loss` gathers only the scored rows.
    """
    _check_logits(logits, pattern, seq_len)
    return logits.index_select(1, pattern.predicting_rows(seq_len, shift, logits.device))


def block_weights(num_masked: Tensor, num_eligible: Tensor, block_size: int,
                  weighting: str) -> Tensor:
    """(B, L) per-token loss weight, constant within a block; 0 for blocks with nothing masked.

    ``elbo``: the realised inverse rate n/k (= L'/k with every token eligible), not 1/t: with
    exactly k = round(t * n) masked, small t gives k in {0, 1} and 1/t would put weights up to 1/eps
    on single tokens (docs/design.md §1). ``none``: 1.
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"objective.weighting={weighting!r}: unknown weighting; "
                          f"allowed: {', '.join(WEIGHTINGS)}")
    has_masked = num_masked > 0
    if weighting == "elbo":
        per_block = num_eligible.float() / num_masked.clamp_min(1).float()
    else:
        per_block = torch.ones_like(num_masked, dtype=torch.float32)
    per_block = torch.where(has_masked, per_block, 0.0)  # (B, nb)
    return per_block.repeat_interleave(block_size, dim=1)  # (B, nb * L')


def _token_nll(rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """-log p(target) and argmax == target for (N, V) logit rows, in float32."""
    rows = rows.float()
    return F.cross_entropy(rows, targets, reduction="none"), rows.argmax(-1) == targets


def _certainty(rows: Tensor, correct: Tensor, temperature: float) -> Tensor:
    """Mean entropy of softmax(rows / T) over the correctly predicted rows (0 when none are):
    only right answers are sharpened, so the term never makes a wrong guess confident. Masked by
    multiplication, not indexing, so the training step does not wait on the host."""
    log_p = F.log_softmax(rows.float() / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (entropy * correct).sum() / correct.sum().clamp_min(1)


def _scatter(values: Tensor, index: tuple[Tensor, Tensor], shape: torch.Size) -> Tensor:
    return values.new_zeros(shape).index_put(index, values)


def diffusion_loss(
    logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    *,
    weights: Tensor,
    pattern: Pattern,
    seq_len: int,
    shift: bool,
    eligible: Optional[Tensor] = None,
    certainty_temperature: Optional[float] = None,
) -> LossOutput:
    """Weighted masked-token NLL, normalised per eligible token (BD3-LM/MDLM ELBO).

    ``loss = sum_{scored} weights * nll / max(1, eligible.sum())`` where scored = mask &
    shift-valid. `target_ids` (B, L) is the clean sequence x_0; `mask` (B, L) bool marks the noised
    tokens; `weights` (B, L) comes from :func:`block_weights`; `eligible` (B, L) bool defaults to
    all tokens. With `certainty_temperature` the output also carries the certainty term (module
    docstring), computed from the same gathered rows.
    """
    _check_logits(logits, pattern, seq_len)
    batch_size = logits.shape[0]
    if eligible is None:
        eligible = torch.ones_like(mask)
    for name, tensor in (("target_ids", target_ids), ("mask", mask), ("weights", weights),
                         ("eligible", eligible)):
        if tensor.shape != (batch_size, seq_len):
            raise ValueError(f"{name}.shape={tuple(tensor.shape)}: "
                             f"must be (B, L)=({batch_size}, {seq_len})")
    rows = pattern.predicting_rows(seq_len, shift, logits.device)
    scored = mask & shift_valid(seq_len, shift, device=logits.device)
    b, i = scored.nonzero(as_tuple=True)  # (N,), (N,)
    scored_logits = logits[b, rows[i]]  # (N, V)
    tok_nll, tok_correct = _token_nll(scored_logits, target_ids[b, i])
    loss = (weights[b, i].float() * tok_nll).sum() / eligible.sum().clamp_min(1)
    nll = _scatter(tok_nll, (b, i), scored.shape)
    correct = _scatter(tok_correct, (b, i), scored.shape)
    certainty = (None if certainty_temperature is None
                 else _certainty(scored_logits, tok_correct, certainty_temperature))
    return LossOutput(loss, nll, scored, correct, certainty)


def ar_loss(logits: Tensor, target_ids: Tensor, loss_mask: Optional[Tensor] = None) -> LossOutput:
    """Next-token cross-entropy: row i predicts token i+1; mean over the scored target positions.

    `loss_mask` (B, L) bool is indexed by *target* position (True = score this token); None = all.
    Token 0 is never a target.
    """
    batch_size, seq_len = target_ids.shape
    if logits.dim() != 3 or logits.shape[:2] != (batch_size, seq_len):
        raise ValueError(f"logits.shape={tuple(logits.shape)}: "
                         f"must be (B, L, V)=({batch_size}, {seq_len}, V)")
    scored = shift_valid(seq_len, True, device=logits.device).expand(batch_size, -1)
    if loss_mask is not None:
        scored = scored & loss_mask
    b, i = scored.nonzero(as_tuple=True)
    tok_nll, tok_correct = _token_nll(logits[b, i - 1], target_ids[b, i])
    loss = tok_nll.sum() / scored.sum().clamp_min(1)
    nll = _scatter(tok_nll, (b, i), scored.shape)
    correct = _scatter(tok_correct, (b, i), scored.shape)
    return LossOutput(loss, nll, scored, correct)
