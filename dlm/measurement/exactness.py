"""`dlm exactness`: do the decoder's fast paths give the reference's tokens on a real checkpoint?

Pairs, each on the same prompts: cached vs no-cache decoding, batch N vs one prompt at a time, and
(for a checkpoint with a causal clean context) self-speculative vs the AR mode, in the default fused
form (`speculative`) or the branched one (`speculative-branched`). In float32 they
are equal by construction. In bf16 a forward over k tokens and k one-token forwards round
differently, so a row may differ; for each such row the report gives the first differing position
and the reference's top-2 logit margin there against bf16's resolution at that logit (a margin
within a few units of it is a rounding near-tie, not a bug).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dlm.data.prompts import load_prompts
from dlm.decoding.engine import generate
from dlm.decoding.text import (
    chat_format_for,
    decode_config_for,
    encode_texts,
    load_for_decoding,
    render_prompts,
)
from dlm.models.backbone import Backbone
from dlm.settings import DecodeConfig, check
from dlm.settings.errors import check_positive_int
from dlm.tensor.patterns import Pattern

SPECULATIVE_PAIRS = {
    "speculative": {},
    "speculative-branched": dict(speculative_form="branched"),
    # two blocks a forward: each row's own likely counts (its positions and block ids)
    "speculative-branched-2": dict(speculative_form="branched", speculative_branches=2),
}
"""Each self-speculative pair's decoder settings; its reference is the AR mode."""
PAIRS = ("cache", "batch", *SPECULATIVE_PAIRS)


@dataclass
class Difference:
    row: int
    position: int  # first generated index where the two outputs differ
    # reference's top-1 minus top-2 logit there (causal forward over the common prefix); nan: not AR
    margin: float
    resolution: float  # bf16 spacing at the top-1 logit: 2^(exponent - 7)


@dataclass
class PairResult:
    pair: str
    equal: int
    rows: int
    differences: list[Difference]

    def line(self) -> str:
        where = "; ".join(f"row {d.row} at token {d.position}: margin {d.margin:.4f} "
                          f"(bf16 step {d.resolution:.4f})" for d in self.differences)
        return f"| {self.pair} | {self.equal}/{self.rows} | {where or '–'} |"


def check_exactness(checkpoint: str | Path, *, prompts: str, num_prompts: int = 20,
                    batch_size: int = 4, max_new_tokens: int = 64, dtype: str = "float32",
                    pairs: Sequence[str] = PAIRS, chat: bool | None = None) -> list[PairResult]:
    """Each pair's share of equal outputs, and a near-tie margin for every differing row."""
    check_positive_int("--num-prompts", num_prompts)
    check_positive_int("--batch-size", batch_size)
    for pair in pairs:
        check(pair in PAIRS, "--pairs", pair, "unknown pair", PAIRS)
    backbone, meta = load_for_decoding(checkpoint, device="cpu", dtype=dtype)
    form = chat_format_for(meta, backbone.tokenizer, chat)
    texts = [p.text for p in load_prompts(prompts, limit=num_prompts, chat=form is not None)]
    texts = render_prompts(backbone.tokenizer, texts, form)
    ar = meta.attention_pattern.autoregressive
    base = decode_config_for(meta, max_new_tokens=max_new_tokens, mode="ar" if ar else None)
    if any(pair in SPECULATIVE_PAIRS for pair in pairs):
        meta.check_decode_mode("speculative")
    ar_mode = (dataclasses.replace(base, mode="ar"), batch_size)
    runs = {
        "cache": ((base, batch_size), (dataclasses.replace(base, cache="none"), batch_size)),
        "batch": ((base, batch_size), (base, 1)),
        **{pair: ((dataclasses.replace(base, mode="speculative", **kw), batch_size), ar_mode)
           for pair, kw in SPECULATIVE_PAIRS.items()},
    }
    decoded: dict[tuple, list[list[int]]] = {}  # a run shared by pairs (the AR mode) decodes once

    def tokens(cfg: DecodeConfig, batch: int) -> list[list[int]]:
        key = (dataclasses.astuple(cfg), batch)
        if key not in decoded:
            decoded[key] = _decode(backbone, texts, cfg, batch, meta.attention_pattern)
        return decoded[key]

    results = []
    for pair in pairs:
        (fast, fast_batch), (ref, ref_batch) = runs[pair]
        got, want = tokens(fast, fast_batch), tokens(ref, ref_batch)
        # the margin is read off a causal forward: it means something for AR references
        causal = ref.mode == "ar"
        diffs = [_difference(backbone, texts[i], i, a, b, causal=causal)
                 for i, (a, b) in enumerate(zip(got, want)) if a != b]
        results.append(PairResult(pair, len(texts) - len(diffs), len(texts), diffs))
    return results


def format_results(results: Sequence[PairResult], *, checkpoint: str | Path, dtype: str) -> str:
    head = ["| pair (fast vs reference) | equal outputs "
            "| first difference: reference top-2 logit margin |",
            "|---|---|---|"]
    note = (f"\n{checkpoint}, {dtype}; cache: cached vs no-cache decoding; "
            "batch: batched vs one prompt at a time; "
            "speculative(-branched[-2]): self-speculative (fused, branched, branched with 2 "
            "blocks) vs the AR mode.")
    return "\n".join(head + [r.line() for r in results]) + note


def _decode(backbone: Backbone, texts: list[str], cfg: DecodeConfig, batch_size: int,
            pattern: Pattern) -> list[list[int]]:
    out: list[list[int]] = []
    tok = backbone.tokenizer
    for i in range(0, len(texts), batch_size):
        ids, attention = encode_texts(tok, texts[i : i + batch_size])
        out += generate(backbone.model, ids, attention_mask=attention,
                        mask_token_id=backbone.mask_token_id, config=cfg,
                        eos_token_id=tok.eos_token_id, pattern=pattern).tokens
    return out


def _difference(backbone: Backbone, text: str, row: int, got: list[int], want: list[int], *,
                causal: bool) -> Difference:
    """Where the outputs part, and (for an AR reference) how close its choice was there: one causal
    forward."""
    shorter_length = min(len(got), len(want))
    position = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), shorter_length)
    if not causal:
        return Difference(row, position, float("nan"), float("nan"))
    prompt = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + want[:position]], device=backbone.model.device)
    with torch.inference_mode():
        logits = backbone.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        logits[backbone.mask_token_id] = -torch.inf  # never a candidate of the decoder
        top = torch.topk(logits, 2).values
    resolution = 2.0 ** (torch.floor(torch.log2(top[0].abs().clamp_min(1e-30))).item() - 7)
    return Difference(row, position, float(top[0] - top[1]), resolution)
