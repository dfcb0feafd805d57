"""What one decode forward costs against the cache as its query grows: q tokens vs one (an AR step).

A block pass forwards `block_size` query tokens (plus the folded-in block on a block's first pass);
an AR step forwards one. On a GPU at batch 1 weight reads dominate and the two cost about the same,
so speed-up follows TPF; on a CPU the forward is compute-bound and the ratio caps it. This table
says which regime a machine is in, with the engine's own runner (static cache, block mask, logits
only for the query).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel

from dlm.decoding.layout import Layout
from dlm.decoding.runner import Runner
from dlm.settings.decode import DecodeConfig
from dlm.tensor import patterns


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def forward_costs(model: PreTrainedModel, queries: Sequence[int], *, context: int,
                  repeats: int = 5, compile: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """Median / min / max ms of one forward of q tokens after `context` cached ones, for each q
    (round-robin repeats after one warm-up each); `ratio` is over q = 1 (timed too, whether asked
    for or not)."""
    device = next(model.parameters()).device
    sizes = sorted({1, *queries})
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context + max(sizes)),
                        generator=gen).to(device)
    cfg = DecodeConfig(block_size=max(sizes), max_new_tokens=max(sizes), compile=compile)
    # every query size fits in one block
    one_block = patterns.get("block", block_size=max(sizes))
    run = Runner(model, Layout.build(torch.ones_like(ids[:, :context]), max(sizes), one_block), cfg)
    times: dict[int, list[float]] = {q: [] for q in sizes}
    with torch.inference_mode():
        run(ids, 0, context, 1, first=True)
        for rep in range(repeats + 1):
            for q in sizes:
                start = _clock(device)
                run(ids, context, context + q, q)
                elapsed = _clock(device) - start
                run.keep_until(context)
                if rep:  # the first round warms up (and compiles)
                    times[q].append(elapsed * 1e3)
    one = statistics.median(times[1])
    return [{"query_tokens": q, "context": context, "ms": statistics.median(t), "ms_min": min(t),
             "ms_max": max(t), "ratio": statistics.median(t) / one}
            for q, t in times.items() if q in queries or q == 1]
