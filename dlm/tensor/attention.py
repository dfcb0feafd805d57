"""The mask objects each attention backend needs, built from a pattern object
(`dlm.tensor.patterns`).

A pattern's training mask is one ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend), the
signature of ``torch.nn.attention.flex_attention``. The dense SDPA mask is that same function
evaluated on index grids; the flex ``BlockMask`` is built from it. HF models stay unmodified:
transformers passes a ready 4-D mask (or a ``BlockMask``) straight to the attention kernel, with our
explicit ``position_ids``.

Document masking (``data.document_mask``, LLaDA 2.0 / SDAR "neat packing"): packed rows carry
per-token document ids ``(B, L)``, and any pattern's function is wrapped by :func:`document_mask_fn`
so a token also attends only inside its own document; position ids then restart at each document.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from dlm.settings import BACKENDS, ConfigError
from dlm.settings.errors import check_positive_int
from dlm.tensor.patterns import MaskFn, Pattern

HF_IMPLEMENTATION = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention",
                     "flash": "flash_attention_2"}


def document_mask_fn(fn: MaskFn, document_ids: Tensor, *, pattern: Pattern, seq_len: int) -> MaskFn:
    """`fn` and same-document: `document_ids` `(B, L)` long, one id per token of each packed row."""

    def doc_fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        q_doc = document_ids[b, pattern.token_index(seq_len, q)]
        k_doc = document_ids[b, pattern.token_index(seq_len, k)]
        same = q_doc == k_doc
        return fn(b, h, q, k) & same

    return doc_fn


def document_positions(document_ids: Tensor) -> Tensor:
    """`(B, L)` position ids that restart at 0 where the document id changes (a packed row's
    documents)."""
    n = document_ids.shape[1]
    idx = torch.arange(n, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # start of each token's document
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def dense_mask(pattern: Pattern, seq_len: int, *, device: torch.device | str = "cpu") -> Tensor:
    """The pattern's mask as a `[T, T]` bool tensor (True = may attend), T its input length for
    noisy length `seq_len` (two halves: 2L)."""
    idx = torch.arange(pattern.input_length(seq_len), device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return pattern.mask_fn(seq_len)(zero, zero, idx[:, None], idx[None, :])


@functools.lru_cache(maxsize=32)
def flex_block_mask(pattern: Pattern, seq_len: int, device: str = "cpu"):
    """The pattern as a flex-attention ``BlockMask`` (batch- and head-broadcast), cached per
    shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = pattern.input_length(seq_len)
    return create_block_mask(pattern.mask_fn(seq_len), B=None, H=None, Q_LEN=n, KV_LEN=n,
                             device=device)


def dense_document_mask(pattern: Pattern, seq_len: int, document_ids: Tensor) -> Tensor:
    """`(B, 1, T, T)` bool: the pattern's mask and same-document, for `document_ids` `(B, L)`."""
    fn = document_mask_fn(pattern.mask_fn(seq_len), document_ids, pattern=pattern, seq_len=seq_len)
    n, device = pattern.input_length(seq_len), document_ids.device
    idx = torch.arange(n, device=device)
    b = torch.arange(document_ids.shape[0], device=device)[:, None, None, None]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return fn(b, zero, idx[None, None, :, None], idx[None, None, None, :])


def flex_document_mask(pattern: Pattern, seq_len: int, document_ids: Tensor):
    """A per-row flex ``BlockMask`` of the pattern and same-document (rebuilt per batch: the ids
    change)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = pattern.input_length(seq_len)
    fn = document_mask_fn(pattern.mask_fn(seq_len), document_ids, pattern=pattern, seq_len=seq_len)
    return create_block_mask(fn, B=document_ids.shape[0], H=None, Q_LEN=n, KV_LEN=n,
                             device=str(document_ids.device))


def resolve_backend(backend: str, pattern: Pattern, device: torch.device | str) -> str:
    """Pick the kernel for `pattern` on `device`; fail in one line where it cannot work."""
    if backend not in BACKENDS:
        raise ConfigError(f"attention.backend={backend!r}: unknown backend; "
                          f"allowed: {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "flex" if on_cuda else "sdpa"
    if backend == "flex" and not on_cuda:
        raise ConfigError(
            "attention.backend='flex': needs CUDA (flex attention has no backward on CPU and "
            "compiled flex gives wrong values there); allowed on CPU: auto, sdpa, eager"
        )
    if backend == "flash":
        if pattern.flash_is_causal is None:
            raise ConfigError(f"attention.backend='flash': pattern {pattern.name!r} needs a custom "
                              "mask; flash serves only plain causal or full attention; "
                              "use flex or sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attention.backend='flash': flash-attn is not installed; "
                              "pip install 'dlm[flash]'")
    return backend


def position_ids(pattern: Pattern, batch_size: int, seq_len: int, *,
                 device: torch.device | str = "cpu",
                 document_ids: Tensor | None = None) -> Tensor:
    """`(B, T)` position ids; two halves repeat 0..L-1 so x_0 aligns with x_t.

    With `document_ids` `(B, L)`, positions restart at 0 at each document of a packed row.
    """
    if document_ids is not None:
        return pattern.input_positions(document_positions(document_ids.to(device)))
    pos = torch.arange(seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
    return pattern.input_positions(pos)


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
    pattern: Pattern,
    *,
    batch_size: int,
    seq_len: int,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    document_ids: Tensor | None = None,
    restart_positions: bool = True,
) -> AttentionInputs:
    """Mask object + position ids for a batch of packed sequences of noisy length `seq_len`.

    Without `document_ids` every row shares one mask (packing gives fixed lengths), so it is
    batch-broadcast. With `document_ids` `(B, L)` the mask is per row (pattern and same-document)
    and, if `restart_positions`, position ids restart at each document.
    """
    device = torch.device(device)
    kernel = resolve_backend(backend, pattern, device)
    docs = None if document_ids is None else document_ids.to(device)
    pos = position_ids(pattern, batch_size, seq_len, device=device,
                       document_ids=docs if restart_positions else None)
    if docs is not None:
        if kernel == "flash":
            raise ConfigError("data.document_mask=true: flash attention takes no mask; "
                              "use attention.backend=flex or sdpa")
        if kernel == "flex":
            return AttentionInputs(flex_document_mask(pattern, seq_len, docs), pos, kernel)
        mask = dense_document_mask(pattern, seq_len, docs)
        return AttentionInputs(additive_mask(mask, dtype) if kernel == "eager" else mask,
                               pos, kernel)
    if kernel == "flash":
        return AttentionInputs(None, pos, kernel, is_causal=pattern.flash_is_causal)
    if kernel == "flex":
        return AttentionInputs(flex_block_mask(pattern, seq_len, str(device)), pos, kernel)
    mask = dense_mask(pattern, seq_len, device=device)[None, None]
    if kernel == "eager":
        mask = additive_mask(mask, dtype)
    return AttentionInputs(mask, pos, kernel)


def describe(pattern: Pattern, seq_len: int) -> str:
    """The mask as text rows ('#' = may attend), for `dlm attention-demo`."""
    check_positive_int("seq_len", seq_len)
    mask = dense_mask(pattern, seq_len)
    n = mask.shape[0]
    label = lambda i: ("c" if i >= seq_len else "n") + str(i % seq_len)  # noqa: E731
    width = max(len(label(i)) for i in range(n))
    lines = [f"{pattern.describe(L=seq_len)}; rows = queries, '#' = may attend"]
    for i in range(n):
        row = "".join("#" if v else "." for v in mask[i].tolist())
        lines.append(f"  {label(i):>{width}} {row}")
    return "\n".join(lines)
