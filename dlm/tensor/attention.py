"""Attention patterns as mask functions, and the mask objects each backend needs.

Each pattern is one ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend), the signature of
``torch.nn.attention.flex_attention``. The dense SDPA mask is that same function evaluated on index
grids; the flex ``BlockMask`` is built from it. HF models stay unmodified: transformers passes a ready
4-D mask (or a ``BlockMask``) straight to the attention kernel, with our explicit ``position_ids``.

Patterns (DESIGN.md §1), with ``blk(i) = i // block_size``:
- ``causal``: ``k <= q``.
- ``bidirectional``: everything.
- ``block``: ``blk(k) <= blk(q)`` over the noisy sequence alone.
- ``block_clean``: input ``x_t ⊕ x_0`` of length 2L (BD3-LM vectorised training); see :func:`block_clean_mask_fn`.
  ``clean_context="causal"`` makes its clean half token-causal (joint AR + diffusion training): the clean KV
  cache is then exactly a causal LM's, so the causal path can verify what the diffusion path drafts.

Document masking (``data.document_mask``, LLaDA 2.0 / SDAR "neat packing"): packed rows carry per-token
document ids ``(B, L)``, and any pattern's function is wrapped by :func:`document_mask_fn` so a token also
attends only inside its own document; position ids then restart at each document.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from dlm.settings import BACKENDS, CLEAN_CONTEXTS, PATTERNS, ConfigError, check
from dlm.settings.errors import check_block_size, check_positive_int

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""(batch, head, q_idx, kv_idx) -> bool tensor, broadcasting over the index tensors."""

HF_IMPLEMENTATION = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention", "flash": "flash_attention_2"}
FLASH_PATTERNS = ("causal", "bidirectional")


def causal_mask_fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return k <= q


def bidirectional_mask_fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return (q >= 0) & (k >= 0)


def block_causal(q_block: Tensor, k_block: Tensor) -> Tensor:
    """The one block rule everything else reuses: causal across blocks, bidirectional inside."""
    return k_block <= q_block


def block_mask_fn(block_size: int) -> MaskFn:
    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return block_causal(q // block_size, k // block_size)

    return fn


def block_clean_mask_fn(seq_len: int, block_size: int, clean_context: str = "block") -> MaskFn:
    """Mask over ``x_t ⊕ x_0`` (length 2L): noisy half first, clean half second.

    With f(i) = i >= L (clean half) and b(i) its block inside its half, q may attend k iff one of
    three sub-masks holds (BD3-LM's block-diagonal / offset-block-causal / block-causal split). With
    `clean_context="causal"` the clean half attends token-causally (k <= q) instead of block-causally;
    the noisy half is unchanged.
    """
    causal_clean = clean_context == "causal"

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        q_clean, k_clean = q >= seq_len, k >= seq_len
        q_block = torch.where(q_clean, q - seq_len, q) // block_size
        k_block = torch.where(k_clean, k - seq_len, k) // block_size
        noisy_diagonal = ~q_clean & ~k_clean & (q_block == k_block)
        noisy_sees_earlier_clean = ~q_clean & k_clean & (k_block < q_block)
        clean_rule = (k <= q) if causal_clean else block_causal(q_block, k_block)
        return noisy_diagonal | noisy_sees_earlier_clean | (q_clean & k_clean & clean_rule)

    return fn


def token_index(pattern: str, seq_len: int, i: Tensor) -> Tensor:
    """Index into the length-L sequence of model input position `i` (block_clean: both halves map to 0..L-1)."""
    return torch.where(i >= seq_len, i - seq_len, i) if pattern == "block_clean" else i


def document_mask_fn(fn: MaskFn, document_ids: Tensor, *, pattern: str, seq_len: int) -> MaskFn:
    """`fn` and same-document: `document_ids` `(B, L)` long, one id per token of each packed row."""

    def doc_fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        same = document_ids[b, token_index(pattern, seq_len, q)] == document_ids[b, token_index(pattern, seq_len, k)]
        return fn(b, h, q, k) & same

    return doc_fn


def document_positions(document_ids: Tensor) -> Tensor:
    """`(B, L)` position ids that restart at 0 where the document id changes (a packed row's documents)."""
    n = document_ids.shape[1]
    idx = torch.arange(n, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of each token's document
    return idx - first


def check_pattern(pattern: str, block_size: int, clean_context: str = "block") -> None:
    """The settings' rules for the values every mask needs (for callers that build masks directly)."""
    check(pattern in PATTERNS, "attention.pattern", pattern, "unknown pattern", PATTERNS)
    check(clean_context in CLEAN_CONTEXTS, "attention.clean_context", clean_context, "unknown clean context",
          CLEAN_CONTEXTS)
    check_block_size(block_size)


def mask_fn(pattern: str, *, seq_len: int, block_size: int, clean_context: str = "block") -> MaskFn:
    """The mask function of `pattern` for noisy length `seq_len` (block_clean indexes 2 * seq_len)."""
    check_pattern(pattern, block_size, clean_context)
    if pattern == "causal":
        return causal_mask_fn
    if pattern == "bidirectional":
        return bidirectional_mask_fn
    if pattern == "block":
        return block_mask_fn(block_size)
    return block_clean_mask_fn(seq_len, block_size, clean_context)


def total_length(pattern: str, seq_len: int) -> int:
    """Model input length: block_clean feeds ``x_t ⊕ x_0``."""
    return 2 * seq_len if pattern == "block_clean" else seq_len


def sequence_length(pattern: str, input_length: int) -> int:
    """L from the model input length: the inverse of :func:`total_length`."""
    return input_length // 2 if pattern == "block_clean" else input_length


def diffusion_input(pattern: str, noised: Tensor, clean: Tensor) -> Tensor:
    """The model input for a diffusion pattern: ``x_t ⊕ x_0`` `(B, 2L)` under block_clean, else ``x_t`` `(B, L)`."""
    return torch.cat([noised, clean], dim=1) if pattern == "block_clean" else noised


def dense_mask(pattern: str, seq_len: int, block_size: int, *, device: torch.device | str = "cpu",
               clean_context: str = "block") -> Tensor:
    """The pattern's mask as a `[q_len, kv_len]` bool tensor (True = may attend).

    For `block_clean`, `seq_len` is L and the result is `[2L, 2L]`.
    """
    fn = mask_fn(pattern, seq_len=seq_len, block_size=block_size, clean_context=clean_context)
    n = total_length(pattern, seq_len)
    idx = torch.arange(n, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return fn(zero, zero, idx[:, None], idx[None, :])


@functools.lru_cache(maxsize=32)
def flex_block_mask(pattern: str, seq_len: int, block_size: int, device: str = "cpu", clean_context: str = "block"):
    """The pattern as a flex-attention ``BlockMask`` (batch- and head-broadcast), cached per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = total_length(pattern, seq_len)
    fn = mask_fn(pattern, seq_len=seq_len, block_size=block_size, clean_context=clean_context)
    return create_block_mask(fn, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


def dense_document_mask(pattern: str, seq_len: int, block_size: int, document_ids: Tensor,
                        clean_context: str = "block") -> Tensor:
    """`(B, 1, T, T)` bool: the pattern's mask and same-document, for `document_ids` `(B, L)`."""
    fn = document_mask_fn(mask_fn(pattern, seq_len=seq_len, block_size=block_size, clean_context=clean_context),
                          document_ids,
                          pattern=pattern, seq_len=seq_len)
    n, device = total_length(pattern, seq_len), document_ids.device
    idx = torch.arange(n, device=device)
    b = torch.arange(document_ids.shape[0], device=device)[:, None, None, None]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return fn(b, zero, idx[None, None, :, None], idx[None, None, None, :])


def flex_document_mask(pattern: str, seq_len: int, block_size: int, document_ids: Tensor,
                       clean_context: str = "block"):
    """A per-row flex ``BlockMask`` of the pattern and same-document (rebuilt per batch: the ids change)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = total_length(pattern, seq_len)
    fn = document_mask_fn(mask_fn(pattern, seq_len=seq_len, block_size=block_size, clean_context=clean_context),
                          document_ids,
                          pattern=pattern, seq_len=seq_len)
    return create_block_mask(fn, B=document_ids.shape[0], H=None, Q_LEN=n, KV_LEN=n, device=str(document_ids.device))


def decode_mask(query_len: int, cache_len: int, block_size: int, *, device: torch.device | str = "cpu") -> Tensor:
    """Decode-time mask `[query_len, cache_len + query_len]`: ``blk(k) <= blk(q + cache_len)``.

    The query block sits at absolute positions ``cache_len ..``; because training used the block-causal
    rule, the cached keys/values are exactly those a full forward would compute.
    """
    q = torch.arange(cache_len, cache_len + query_len, device=device)
    k = torch.arange(cache_len + query_len, device=device)
    return block_causal(q[:, None] // block_size, k[None, :] // block_size)


def resolve_backend(backend: str, pattern: str, device: torch.device | str) -> str:
    """Pick the kernel for `pattern` on `device`; fail in one line where it cannot work."""
    if backend not in BACKENDS:
        raise ConfigError(f"attention.backend={backend!r}: unknown backend; allowed: {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "flex" if on_cuda else "sdpa"
    if backend == "flex" and not on_cuda:
        raise ConfigError(
            "attention.backend='flex': needs CUDA (flex attention has no backward on CPU and compiled flex "
            "gives wrong values there); allowed on CPU: auto, sdpa, eager"
        )
    if backend == "flash":
        if pattern not in FLASH_PATTERNS:
            raise ConfigError(
                f"attention.backend='flash': pattern {pattern!r} needs a custom mask; flash serves only "
                f"{', '.join(FLASH_PATTERNS)}; use flex or sdpa"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attention.backend='flash': flash-attn is not installed; pip install 'dlm[flash]'")
    return backend


def position_ids(pattern: str, batch_size: int, seq_len: int, *, device: torch.device | str = "cpu",
                 document_ids: Tensor | None = None) -> Tensor:
    """`(B, T)` position ids; block_clean repeats 0..L-1 for both halves so x_0 aligns with x_t.

    With `document_ids` `(B, L)`, positions restart at 0 at each document of a packed row.
    """
    if document_ids is not None:
        pos = document_positions(document_ids.to(device))
        return torch.cat([pos, pos], dim=1) if pattern == "block_clean" else pos
    pos = torch.arange(seq_len, device=device)
    if pattern == "block_clean":
        pos = torch.cat([pos, pos])
    return pos.unsqueeze(0).expand(batch_size, -1)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask -> float 0 / min-value mask, the form `eager` attention *adds* to its scores.

    A bool mask passed to eager is silently wrong (True adds 1), so eager always gets this form.
    The dtype minimum stands for -inf, as in transformers, so fully masked rows do not become NaN.
    """
    zeros = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zeros, torch.finfo(dtype).min)


@dataclass
class AttentionInputs:
    """What a forward pass under a pattern needs besides the input ids."""

    attention_mask: Union[Tensor, "torch.nn.attention.flex_attention.BlockMask", None]
    """SDPA: (1 or B, 1, T, T) bool; eager: the same as float; flex: BlockMask; flash: None."""
    position_ids: Tensor  # (B, T) long
    backend: str
    is_causal: bool | None = None
    """Only for flash, which takes no mask: the pattern's causality, passed through HF's kwargs."""

    def as_kwargs(self) -> dict:
        """Keyword arguments for an HF causal LM's forward."""
        kwargs = {"attention_mask": self.attention_mask, "position_ids": self.position_ids}
        if self.is_causal is not None:
            kwargs["is_causal"] = self.is_causal
        return kwargs


def build_attention_inputs(
    pattern: str,
    *,
    batch_size: int,
    seq_len: int,
    block_size: int,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    document_ids: Tensor | None = None,
    restart_positions: bool = True,
    clean_context: str = "block",
) -> AttentionInputs:
    """Mask object + position ids for a batch of packed sequences of noisy length `seq_len`.

    Without `document_ids` every row shares one mask (packing gives fixed lengths), so it is batch-broadcast.
    With `document_ids` `(B, L)` the mask is per row (pattern and same-document) and, if `restart_positions`,
    position ids restart at each document. `clean_context` shapes block_clean's clean half (block | causal).
    """
    check_pattern(pattern, block_size, clean_context)
    cc = clean_context
    device = torch.device(device)
    kernel = resolve_backend(backend, pattern, device)
    docs = None if document_ids is None else document_ids.to(device)
    pos = position_ids(pattern, batch_size, seq_len, device=device, document_ids=docs if restart_positions else None)
    if docs is not None:
        if kernel == "flash":
            raise ConfigError("data.document_mask=true: flash attention takes no mask; "
                              "use attention.backend=flex or sdpa")
        if kernel == "flex":
            return AttentionInputs(flex_document_mask(pattern, seq_len, block_size, docs, cc), pos, kernel)
        mask = dense_document_mask(pattern, seq_len, block_size, docs, cc)
        return AttentionInputs(additive_mask(mask, dtype) if kernel == "eager" else mask, pos, kernel)
    if kernel == "flash":
        return AttentionInputs(None, pos, kernel, is_causal=pattern == "causal")
    if kernel == "flex":
        return AttentionInputs(flex_block_mask(pattern, seq_len, block_size, str(device), cc), pos, kernel)
    mask = dense_mask(pattern, seq_len, block_size, device=device, clean_context=cc)[None, None]
    if kernel == "eager":
        mask = additive_mask(mask, dtype)
    return AttentionInputs(mask, pos, kernel)


def describe(pattern: str, seq_len: int, block_size: int, clean_context: str = "block") -> str:
    """The mask as text rows ('#' = may attend), for `dlm attention-demo`."""
    check_positive_int("seq_len", seq_len)
    mask = dense_mask(pattern, seq_len, block_size, clean_context=clean_context)
    n = mask.shape[0]
    label = lambda i: ("c" if pattern == "block_clean" and i >= seq_len else "n") + str(i % seq_len)  # noqa: E731
    width = max(len(label(i)) for i in range(n))
    lines = [f"{pattern} (L={seq_len}, block_size={block_size}); rows = queries, '#' = may attend"]
    for i in range(n):
        row = "".join("#" if v else "." for v in mask[i].tolist())
        lines.append(f"  {label(i):>{width}} {row}")
    return "\n".join(lines)
