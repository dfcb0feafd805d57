"""Model forwards over a slice of the sequence against the KV cache: what every decode mode shares.

The cache is transformers' own: `StaticCache` (preallocated once per generate call, written in
place: no copy per append, static shapes for `torch.compile` / CUDA graphs) or `DynamicCache`. Masks
past the prompt are built for `MASK_ROWS` query rows at once and sliced by the passes inside them
(the AR loop's steps, a decode's blocks); the LM head runs only on the positions asked for
(`logits_to_keep`), so committed positions and the folded-in block cost no logits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, StaticCache

from dlm.decoding.layout import Layout
from dlm.settings.decode import DecodeConfig
from dlm.tensor.attention import additive_mask

_COMPILED = "_dlm_compiled"
MASK_ROWS = 64
"""Query rows a mask past the prompt is built for at once (a slice serves each pass inside them)."""


def compiled(model: PreTrainedModel):
    """`torch.compile` of the model, made once per model and kept on it (CUDA: CUDA graphs)."""
    if _COMPILED not in model.__dict__:
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        model.__dict__[_COMPILED] = torch.compile(model, mode=mode, dynamic=None)
    return model.__dict__[_COMPILED]


class Runner:
    """Forwards of `seq[:, start:end]`; the cache holds `:start` (or nothing: `cache=none`)."""

    def __init__(self, model: PreTrainedModel, layout: Layout, cfg: DecodeConfig):
        self.model, self.layout = model, layout
        self.eager = model.config._attn_implementation == "eager"
        self.static = cfg.static_cache
        self.cache = None
        if cfg.use_cache:
            self.cache = (StaticCache(config=model.config, max_cache_len=layout.total)
                          if self.static else DynamicCache(config=model.config))
        self.step = compiled(model) if cfg.compile else model
        self.length = 0  # tokens held by the cache
        self._mask: tuple[int, int, tuple[int, int] | None, Tensor] | None = None
        """(first, last query row, noisy block, mask) built last."""

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def mask(self, start: int, end: int, noisy: tuple[int, int] | None = None) -> Tensor:
        """Queries `start:end` (slots `noisy[0]:noisy[1]` the block being denoised), a slice of the
        last mask built when it holds them with the same noisy block: a block's later passes slice
        its first pass's mask. Past the prompt, the AR loop's mask is built for at least `MASK_ROWS`
        query rows at once, so its next steps slice it instead of building their own."""
        if self._mask is not None:
            lo, hi, built_for, mask = self._mask
            if lo <= start and end <= hi and built_for == noisy:
                return self._rows(mask, start - lo, end - lo, end)
        # the AR loop's steps: build for the next ones too
        ahead = start >= self.layout.prompt_len and noisy is None
        rows_end = min(self.layout.total, max(end, start + MASK_ROWS)) if ahead else end
        mask = self.fresh_mask(start, rows_end, noisy)
        self._mask = (start, rows_end, noisy, mask)
        return self._rows(mask, 0, end - start, end)

    def fresh_mask(self, start: int, end: int, noisy: tuple[int, int] | None = None, *,
                   group_width: int | None = None) -> Tensor:
        """Queries `start:end` built now from the layout (over every slot of a static cache, else
        the `end` tokens so far), in the model's form: what a caller that edits the layout
        (speculative decoding's holes and branches) passes."""
        mask = self.layout.mask(start, end, self.layout.total if self.static else end, noisy,
                                group_width=group_width)
        return additive_mask(mask, self.model.dtype) if self.eager else mask

    def _rows(self, mask: Tensor, first: int, last: int, end: int) -> Tensor:
        """Query rows `first:last` of `mask`, over the keys a forward ending at `end` attends (a
        static cache: all of its slots; otherwise the `end` tokens so far)."""
        rows = mask[:, :, first:last]
        return rows if self.static else rows[..., :end]

    def __call__(self, seq: Tensor, start: int, end: int, keep: int | Tensor, *,
                 first: bool = False, noisy: tuple[int, int] | None = None,
                 mask: Tensor | None = None) -> Tensor:
        """Logits `(B, K, V)` for `keep` (the last `keep` inputs, or input-relative indices).

        `first` marks a forward that feeds the prompt (a prefill, or a first pass), which runs
        uncompiled: its shape is the prompt's. `noisy`: the slots of the block being denoised (none:
        every input is committed).
        `mask`: the caller's own, built fresh from a layout it edits (speculative decoding's holes).
        """
        step = self.model if first else self.step
        attention = self.mask(start, end, noisy) if mask is None else mask
        out = step(input_ids=seq[:, start:end], attention_mask=attention,
                   position_ids=self.layout.position_ids[:, start:end], cache=self.cache,
                   use_cache=self.cached, logits_to_keep=keep)
        self.length = end if self.cached else 0
        return out.logits

    def subset(self, rows: Tensor, seq: Tensor, start: int, end: int, keep: int | Tensor,
               noisy: tuple[int, int] | None = None) -> Tensor:
        """Logits of `rows` only, for a block's later pass (the others have nothing left to commit).

        The cache holds `:start` and stays as it is: the block's KV is recomputed every pass, so the
        forward runs on a copy of those rows' cache, dropped afterwards.
        """
        lo = start if self.cached else 0
        cache = None
        if self.cached:
            data = [(layer.keys[rows, :, :start], layer.values[rows, :, :start])
                    for layer in self.cache.layers]
            cache = DynamicCache(ddp_cache_data=data, config=self.model.config)
        # no cache: a new shape every pass, run uncompiled
        step = self.step if self.cached else self.model
        out = step(input_ids=seq[rows, lo:end],
                   attention_mask=self.mask(lo, end, noisy)[rows][..., :end],
                   position_ids=self.layout.position_ids[rows, lo:end], cache=cache,
                   use_cache=self.cached, logits_to_keep=keep)
        return out.logits

    def keep_until(self, end: int) -> int:
        """Drop cached KV past `end` (repeated passes must not append); where the next input
        starts."""
        if not self.cached:
            return 0  # no cache: every pass forwards the whole sequence
        if self.length > end:
            self.cache.crop(end - self.length)  # transformers crops by a negative count
        self.length = min(self.length, end)
        return end

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` of the batch (the others finished): cache rows, layout and mask follow.
        With none left nothing more runs, so nothing is copied."""
        if not len(rows):
            return
        self.layout = self.layout.select(rows)
        if self.cached and self.length:
            self.cache.reorder_cache(rows)
        if self._mask is not None:
            lo, hi, noisy, mask = self._mask
            self._mask = (lo, hi, noisy, mask[rows])
