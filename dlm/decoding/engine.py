"""KV-cached parallel decoding for block-diffusion LMs (Fast-dLLM, Efficient-DLM).

A model trained with the `block` / `block_clean` patterns attends block-causally, so the keys and
values of finished blocks never change: cache the prompt once (in the first block's first pass),
then decode one block at a time against the cache (docs/design.md §1 "Decoding"). Each block starts
as [MASK] tokens; every forward pass commits the masked positions the model is confident about (at
least one), until the block is complete. Positions and block ids per row: `dlm.decoding.layout`; the
forwards, cache and logits: `dlm.decoding.runner`.

Early exit. A row is done once its EOS is committed and nothing before it is masked (or its
committed text shows a stop string): its tokens up to EOS can no longer change, so it stops
mid-block and leaves the batch (its cache rows dropped); a batch then costs what its unfinished rows
cost.

Accounting. `nfe` counts every model forward (one per denoising pass). There is no separate prefill:
the first block's first pass feeds the prompt too (its KV enters the cache there), and the completed
block's KV is appended inside the next block's first pass, so cached and uncached decoding make the
same number of forwards, and a generate call makes `nfe` forwards in all. `row_forwards` counts, per
row, the forwards it took part in. A length limit that is not a multiple of `block_size` cuts the
last block short. EOS is kept in the output (as `transformers` does); tokens after it are dropped. A
stop string is cut off together with the token that starts it, so the decoded text holds no part of
it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlm.decoding.ar import greedy_ar
from dlm.decoding.batch import ActiveRows
from dlm.decoding.drafting import Drafter, SelfDrafter
from dlm.decoding.layout import Layout
from dlm.decoding.output import GenerationOutput
from dlm.decoding.policies import candidates, choose, propose
from dlm.decoding.runner import Runner
from dlm.decoding.speculative import Speculation, slots_needed, speculative
from dlm.decoding.stopping import Stopper, check_inputs
from dlm.settings.decode import DecodeConfig
from dlm.settings.errors import ConfigError, check
from dlm.tensor import patterns
from dlm.tensor.patterns import Pattern

MASK_IMPLEMENTATIONS = ("sdpa", "eager")
"""HF attention implementations that take the dense 4-D mask the decoder builds."""


@dataclass
class _Pass:
    """One forward over a block: inputs `seq[:, lo:end]` (the completed block or the prompt folded
    in first), the block `start:end`, the block columns still masked in some row (`cols`), and the
    rows that take part (`sub`; None: all of them, else those with something left to commit)."""

    lo: int
    start: int
    end: int
    cols: list[int]
    sub: Tensor | None


class _BlockDecoder:
    """One diffusion generate call: the block loop. Holds the runner (cache, layout), the batch
    (`rows`), the settings and the stopping rules; `denoise` decodes one block in place, pass by
    pass."""

    def __init__(self, run: Runner, rows: ActiveRows, cfg: DecodeConfig, mask_token_id: int,
                 stopper: Stopper, generator: torch.Generator | None) -> None:
        self.run, self.rows, self.cfg = run, rows, cfg
        self.mask_token_id, self.stopper, self.generator = mask_token_id, stopper, generator

    def logits(self, p: _Pass) -> tuple[Tensor, Tensor | None]:
        """(logits `(B, len(cols), V)` predicting the block columns `p.cols`, the logit to keep for
        the block's first column when this pass reaches back into the block before: with `shift`,
        the previous token predicts it)."""
        shift, offset = self.cfg.shift, p.start - p.lo
        # predicted by the previous block's last logit
        from_prev = shift and offset == 0 and p.cols[0] == 0
        index = [offset + c - shift for c in p.cols[from_prev:]]
        # the input reaches back: keep the logit predicting col 0
        lead = shift and offset > 0 and p.cols[0] != 0
        index = [offset - 1] * lead + index
        n = p.end - p.lo
        # the last k inputs: no index tensor to build
        tail = index and index == list(range(n - len(index), n))
        keep = (len(index) if tail
                else torch.tensor(index, dtype=torch.long, device=self.rows.seq.device))
        noisy, seq = (p.start, p.end), self.rows.seq
        # the input holds the prompt (no cache: every pass), a new shape each time: uncompiled
        if p.sub is None:
            logits = self.run(seq, p.lo, p.end, keep, first=p.lo == 0, noisy=noisy)
        else:
            logits = self.run.subset(p.sub, seq, p.lo, p.end, keep, noisy)
        first_col = logits[:, 0] if shift and offset > 0 and p.sub is None else None
        logits = logits[:, 1:] if lead else logits
        if from_prev:
            prev = self.rows.prev if p.sub is None else self.rows.prev[p.sub]
            logits = torch.cat([prev[:, None], logits], dim=1)
        return logits, first_col

    def commit(self, logits: Tensor, p: _Pass, fresh: bool) -> None:
        """Propose tokens for `p.cols`, choose which [MASK]s to commit under the policy, write them
        into `rows.seq`. On a block's first pass (`fresh`: everything masked, most passes) every
        position is a candidate; a pass over the whole block skips the scatter to the block's
        width."""
        cfg, rows = self.cfg, self.rows
        block = (rows.seq[:, p.start:p.end] if p.sub is None
                 else rows.seq[p.sub, p.start:p.end])
        tokens, conf = propose(logits, cfg, self.mask_token_id, self.generator)
        # columns no row has masked are never candidates
        if len(p.cols) < p.end - p.start:
            index = torch.tensor(p.cols, device=block.device)
            wide_tokens = block.clone()
            wide_conf = torch.full(block.shape, -1.0, device=block.device, dtype=conf.dtype)
            wide_tokens[:, index], wide_conf[:, index] = tokens, conf
            tokens, conf = wide_tokens, wide_conf
        if fresh:  # everything masked: no comparison to make
            everything = torch.ones_like(block, dtype=torch.bool)
            cand = (None if cfg.sub_block_size is None
                    else candidates(everything, cfg.sub_block_size))
        else:  # a committed token is never [MASK]: `propose` excludes it
            cand = candidates(block == self.mask_token_id, cfg.sub_block_size)
        chosen = choose(conf, cand, cfg)
        if p.sub is None:
            block.copy_(torch.where(chosen, tokens, block))  # `block` is a view of `rows.seq`
        else:
            rows.seq[p.sub, p.start:p.end] = torch.where(chosen, tokens, block)

    def denoise(self, lo: int, start: int, end: int) -> None:
        """Decode `seq[:, start:end]` in place; the first pass also feeds `seq[:, lo:start]` (the
        completed block whose KV is not cached yet, or the prompt). Rows that finish leave the batch
        as soon as they do; rows whose block is complete sit out the block's later passes."""
        rows, run = self.rows, self.run
        masked_host, sub, fresh = [[True] * (end - start) for _ in rows.ids], None, True
        while True:
            cols = [c for c in range(end - start) if any(row[c] for row in masked_host)]
            p = _Pass(lo, start, end, cols, sub)
            logits, first_col = self.logits(p)
            if first_col is not None:
                rows.prev = first_col
            lo = run.keep_until(start)
            self.commit(logits, p, fresh)
            rows.count_forward(None if sub is None else sub.tolist())
            masked_host, finished = self.sync(start, end)
            fresh = False
            if not any(any(row) for row in masked_host):
                finished = self.at_block_end(finished, end)
            if any(finished):
                run.select(rows.drop(finished, end))
                masked_host = [m for m, f in zip(masked_host, finished) if not f]
            waiting = [k for k, row in enumerate(masked_host) if any(row)]
            if not waiting:
                return
            sub = (None if len(waiting) == len(masked_host)
                   else torch.tensor(waiting, device=rows.seq.device))

    def sync(self, start: int, end: int) -> tuple[list[list[bool]], list[bool]]:
        """The pass's one host sync: the block's tokens, from which what is still masked and (early
        exit) the rows that finished are read on the host."""
        rows, stopper = self.rows, self.stopper
        block = rows.seq[:, start:end].tolist()
        masked_host = [[t == self.mask_token_id for t in row] for row in block]
        if not (self.cfg.early_exit and stopper.active):
            return masked_host, [False] * len(block)
        finished = stopper.done_in_block(rows.seq, block, masked_host, start, rows.prompt_len)
        return masked_host, finished

    def at_block_end(self, finished: list[bool], end: int) -> list[bool]:
        """Without early exit, rows are checked for EOS / stop strings once their block is
        complete."""
        if self.cfg.early_exit:
            return finished
        rows = self.rows
        return self.stopper.update(torch.tensor(finished, device=rows.seq.device),
                                   rows.seq[:, rows.prompt_len:end]).tolist()


def _decode(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, cfg: DecodeConfig,
            mask_token_id: int, stopper: Stopper, generator: torch.Generator | None,
            pattern: Pattern) -> ActiveRows:
    """The block loop over the rows still decoding; returns every row's tokens and forward
    counts."""
    prompt_len, total = input_ids.shape[1], input_ids.shape[1] + cfg.max_new_tokens
    layout = Layout.build(attention_mask, cfg.max_new_tokens, pattern.resized(cfg.block_size))
    run = Runner(model, layout, cfg)
    masks = input_ids.new_full((input_ids.shape[0], cfg.max_new_tokens), mask_token_id)
    rows = ActiveRows(torch.cat([input_ids, masks], dim=1), prompt_len)
    decoder = _BlockDecoder(run, rows, cfg, mask_token_id, stopper, generator)
    # the first pass feeds the prompt too: its KV enters the cache there, no prefill forward
    lo, start = 0, prompt_len
    while start < total and rows.active:
        end = min(start + cfg.block_size, total)
        decoder.denoise(lo, start, end)
        # the completed block enters the cache in the next pass
        lo = start if run.cached else 0
        start = end
    rows.drop([True] * len(rows.ids), start)
    return rows


def _resolve_config(config: DecodeConfig | None, overrides: dict) -> DecodeConfig:
    fields = [f.name for f in dataclasses.fields(DecodeConfig)]
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"decode.{key}: unknown key; allowed: {', '.join(fields)}")
    return dataclasses.replace(config or DecodeConfig(), **overrides)


def _default_pattern(mode: str) -> Pattern:
    """Without a checkpoint's pattern: block-causal, or the joint model's for speculative
    decoding."""
    if mode == "speculative":
        return patterns.get("block_clean", clean_context="causal")
    return patterns.get("block")


def _check_decodable(model: PreTrainedModel, cfg: DecodeConfig, pattern: Pattern,
                     mask_token_id: int | None) -> None:
    """One-line errors for a mode, attention implementation or [MASK] id decoding cannot serve."""
    check(cfg.mode != "speculative" or pattern.verifies, "decode.mode", cfg.mode,
          f"needs a pattern whose clean context is token-causal (this one: {pattern.describe()}); "
          "allowed: diffusion, ar")
    impl = model.config._attn_implementation
    if impl not in MASK_IMPLEMENTATIONS:
        raise ConfigError(f"model attn_implementation={impl!r}: decoding passes a dense 4-D mask; "
                          "load the model with attn_implementation='sdpa' (or 'eager') "
                          "for decoding")
    if cfg.mode != "ar" and mask_token_id is None:
        raise ConfigError(f"mask_token_id=None: decode.mode={cfg.mode} needs the [MASK] token id "
                          "(or use mode=ar)")


def generate(model: PreTrainedModel, input_ids: Tensor, *, mask_token_id: int | None = None,
             attention_mask: Tensor | None = None, config: DecodeConfig | None = None,
             eos_token_id: int | Sequence[int] | None = None, stop: Sequence[str] | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None,
             generator: torch.Generator | None = None, pattern: Pattern | None = None,
             drafter: Drafter | None = None, **overrides) -> GenerationOutput:
    """Decode left-padded prompts `input_ids` `(B, P)`: block-parallel (`mode=diffusion`), lean AR,
    or self-speculative (`mode=speculative`: diffusion drafts, causal verify; the AR mode's greedy
    output).

    `overrides` are `DecodeConfig` fields (`threshold=0.5`) applied over `config`.
    `eos_token_id=None` means no EOS stop. `pattern`: the checkpoint's attention pattern
    (`CheckpointMeta.attention_pattern`), whose rules the decode masks follow at the decode's block
    size (default: block-causal; for `mode=speculative`, block_clean with a causal clean context).
    The model must run sdpa or eager attention: the decoder passes a dense 4-D mask. `drafter`: who
    proposes the tokens `mode=speculative` verifies (default: the model's own noisy block,
    `SelfDrafter`); the output is the AR mode's whatever it proposes.
    Example::

        generate(model, ids, mask_token_id=mask_id, block_size=16, eos_token_id=tok.eos_token_id)
    """
    cfg = _resolve_config(config, overrides)
    pattern = pattern or _default_pattern(cfg.mode)
    _check_decodable(model, cfg, pattern, mask_token_id)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None
                      else attention_mask.to(input_ids.device))
    check_inputs(model, input_ids, attention_mask, cfg.max_new_tokens, stop, tokenizer)
    stopper = Stopper(eos_token_id, stop, tokenizer, input_ids.device)
    with torch.inference_mode():
        if cfg.mode == "ar":
            layout = Layout.build(attention_mask, cfg.max_new_tokens, patterns.get("causal"))
            rows = greedy_ar(Runner(model, layout, cfg), input_ids,
                             cfg.max_new_tokens, stopper, exclude=mask_token_id)
        elif cfg.mode == "speculative":
            # the token-causal layout: the clean cache is an AR model's
            slots = slots_needed(cfg.max_new_tokens, cfg.block_size - 1, cfg.speculative_form)
            spec = Speculation(cfg.max_new_tokens, cfg.block_size - 1, mask_token_id,
                               drafter or SelfDrafter(mask_token_id), cfg.shift,
                               form=cfg.speculative_form, branches=cfg.speculative_branches)
            run = Runner(model, Layout.build(attention_mask, slots, pattern.resized(1)), cfg)
            rows = speculative(run, input_ids, spec, stopper)
        else:
            rows = _decode(model, input_ids, attention_mask, cfg, mask_token_id, stopper,
                           generator, pattern)
    return stopper.output(rows.tokens, rows.nfe, rows.forwards)
