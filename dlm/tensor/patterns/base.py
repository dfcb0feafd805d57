"""What an attention pattern is: one object that training, decoding and scoring all ask.

A pattern says three things, and everything else is derived from them here:
- how committed (clean) tokens see each other: :meth:`Pattern.clean_sees`;
- how a noisy query block sees the clean tokens before it: :meth:`Pattern.noisy_sees` (it always
  sees its own block, bidirectionally);
- whether the model input is the noisy sequence alone or ``x_t ⊕ x_0`` (BD3-LM's vectorised
  training: ``two_halves``), and whether it trains autoregressively.

The training mask (:meth:`Pattern.mask_fn`, the ``mask_mod(b, h, q_idx, kv_idx)`` of flex attention,
evaluated on index grids for SDPA), the decoder's mask over its KV cache and the exact-likelihood
rows' mask (:meth:`Pattern.view`) are all built from those two rules, so they cannot disagree: a
decode step is the training mask restricted to the tokens the decode holds (tests/tensor/patterns
check it for every pattern). Block ids are ``position // block_size``; ``block_size`` is the
object's (a schedule's stage or a decoder's block size gives a resized copy,
:meth:`Pattern.resized`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import torch
from torch import Tensor

from dlm.settings import check
from dlm.settings.errors import check_block_size

if TYPE_CHECKING:
    from dlm.settings import ExperimentConfig

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""(batch, head, q_idx, kv_idx) -> bool tensor, broadcasting over the index tensors."""


def block_causal(q_block: Tensor, k_block: Tensor) -> Tensor:
    """The block rule most patterns reuse: causal across blocks, bidirectional inside."""
    return k_block <= q_block


class Slots(NamedTuple):
    """Tokens on one side of a mask (queries or keys), as broadcastable tensors.

    `index` orders tokens left to right (a slot of the decode, a position of the sequence); `block`
    is the block id; `noisy` marks tokens of a block being denoised (or a scoring copy); `group`
    tells noisy blocks apart (tokens of one group see each other)."""

    index: Tensor
    block: Tensor
    noisy: Tensor
    group: Tensor


@dataclass(frozen=True)
class Pattern:
    """An attention pattern at one block size. Subclasses set `name` (their module's name: the
    registry finds them by it), override the rules that differ, and may add options as dataclass
    fields (the experiment's `attention.options`)."""

    block_size: int = 1
    name: ClassVar[str] = ""
    autoregressive: ClassVar[bool] = False
    """Trains with next-token cross-entropy on the clean input and decodes in the AR mode."""
    two_halves: ClassVar[bool] = False
    """The model input is ``x_t ⊕ x_0`` (length 2L): noisy blocks see an exactly clean context."""
    exact_cache: ClassVar[bool] = True
    """Decoding over a KV cache computes what training computed (False: an approximation the
    ablation pays)."""
    flash_is_causal: ClassVar[bool | None] = None
    """The flash kernel serves the pattern with this `is_causal`; None: it needs a mask (flex or
    sdpa)."""

    def __post_init__(self) -> None:
        check_block_size(self.block_size)

    # -- the rules a pattern defines ---------------------------------------------------------------
    def clean_sees(self, q: Slots, k: Slots) -> Tensor:
        """Whether clean token q attends clean token k (default: block-causal)."""
        return block_causal(q.block, k.block)

    def noisy_sees(self, q: Slots, k: Slots) -> Tensor:
        """Whether a noisy token q attends clean token k of another group (default: every earlier
        block)."""
        return k.block < q.block

    @property
    def verifies(self) -> bool:
        """Its clean context is token-causal, so the clean KV cache is an AR model's:
        self-speculative decoding (the causal path verifies what the noisy path drafts) and the
        joint AR objective apply."""
        return self.autoregressive

    def check(self, cfg: "ExperimentConfig") -> None:
        """Rules across the experiment's other fields; raise ConfigError naming the first bad
        key."""
        a, o = cfg.attention, cfg.objective
        check(not a.block_size_schedule or not self.autoregressive,
              "attention.block_size_schedule", [list(s) for s in a.block_size_schedule],
              f"the {self.name} pattern has no blocks; set a diffusion pattern")
        check(o.ar_weight > 0 or o.diffusion_weight > 0 or self.autoregressive,
              "objective.diffusion_weight", o.diffusion_weight,
              "must be > 0 when objective.ar_weight is 0 (nothing would train)")
        check(o.certainty_weight == 0 or not self.autoregressive, "objective.certainty_weight",
              o.certainty_weight, f"the {self.name} pattern trains no masked tokens to sharpen; "
              "set a diffusion pattern or 0")
        check(o.ar_weight == 0 or (self.two_halves and self.verifies), "objective.ar_weight",
              o.ar_weight,
              f"needs attention.pattern=block_clean with attention.clean_context=causal "
              f"(got {a.pattern}, clean_context {a.clean_context}: "
              "its clean half is not token-causal)")

    # -- derived: the layout of the model input ----------------------------------------------------
    def resized(self, block_size: int) -> "Pattern":
        return dataclasses.replace(self, block_size=block_size)

    def input_length(self, seq_len: int) -> int:
        """Model input length for noisy length L."""
        return 2 * seq_len if self.two_halves else seq_len

    def sequence_length(self, input_length: int) -> int:
        """L from the model input length: the inverse of :meth:`input_length`."""
        return input_length // 2 if self.two_halves else input_length

    def model_input(self, noised: Tensor, clean: Tensor) -> Tensor:
        """`(B, T)`: ``x_t ⊕ x_0`` for two halves, else ``x_t``."""
        return torch.cat([noised, clean], dim=1) if self.two_halves else noised

    def token_index(self, seq_len: int, i: Tensor) -> Tensor:
        """Index into the length-L sequence of model input position `i` (both halves map to
        0..L-1)."""
        return torch.where(i >= seq_len, i - seq_len, i) if self.two_halves else i

    def input_positions(self, positions: Tensor) -> Tensor:
        """`(B, T)` position ids of the model input from those of the sequence `(B, L)` (each half
        repeats them)."""
        return torch.cat([positions, positions], dim=1) if self.two_halves else positions

    def predicting_rows(self, seq_len: int, shift: bool,
                        device: torch.device | str | None = None) -> Tensor:
        """`(L,)` long: the logit row that predicts token i. Shift: row i-1 (row 0 a placeholder).
        With two halves a block's first token is predicted from the clean row of token i-1, since
        the noisy row i-1 sits in the block before and cannot see it; decoding does the same (the
        last committed token predicts the next)."""
        i = torch.arange(seq_len, device=device)
        if not shift:
            return i
        rows = (i - 1).clamp_min(0)
        if self.two_halves:
            rows = torch.where((i % self.block_size == 0) & (i > 0), seq_len + i - 1, rows)
        return rows

    # -- derived: masks ----------------------------------------------------------------------------
    def view(self, q: Slots, k: Slots) -> Tensor:
        """Whether query q attends key k, from the two rules: a noisy query sees its own group and
        the clean tokens `noisy_sees` allows; a clean query sees the clean tokens `clean_sees`
        allows, and nothing noisy."""
        from_noisy = torch.where(k.noisy, q.group == k.group, self.noisy_sees(q, k))
        from_clean = ~k.noisy & self.clean_sees(q, k)
        return torch.where(q.noisy, from_noisy, from_clean)

    def mask_fn(self, seq_len: int) -> MaskFn:
        """The training mask over the model input for noisy length `seq_len`: the view over that
        input."""
        def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return self.view(self.training_slots(seq_len, q), self.training_slots(seq_len, k))

        return fn

    def training_slots(self, seq_len: int, i: Tensor) -> Slots:
        """The training input's tokens at input positions `i`: with two halves the first L are
        noisy, grouped by block; a single sequence is clean (its rule is the clean one, over noisy
        or clean tokens alike)."""
        token = self.token_index(seq_len, i)
        block = token // self.block_size
        noisy = i < seq_len if self.two_halves else torch.zeros_like(i, dtype=torch.bool)
        return Slots(token, block, noisy, block)

    def describe(self, **leading: object) -> str:
        """`name (block_size=B, option=value, ...)`, with `leading` fields first."""
        fields = leading | {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return f"{self.name} ({', '.join(f'{key}={value}' for key, value in fields.items())})"
