"""Settings of the parallel decoder (`decode.<field>` in `dlm eval`, `--<field>` in
`dlm generate`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from omegaconf import OmegaConf

from dlm.settings.errors import (
    ConfigError,
    check,
    check_block_size,
    check_choices,
    check_positive_int,
    deprecated,
    divisors,
)


@dataclass
class DecodeConfig:
    """Knobs of the parallel decoder; validated on construction (`decode.<field>` in errors)."""

    mode: Literal["diffusion", "ar", "speculative"] = "diffusion"
    """diffusion: block-by-block parallel decoding | ar: the lean greedy AR loop of the same engine
    (same cache, same compile), one token per forward under the causal mask: the AR baseline |
    speculative: the diffusion path drafts `block_size - 1` tokens, the causal path verifies them
    (lossless: the AR mode's greedy output; needs a checkpoint trained with
    `attention.clean_context: causal`)."""
    block_size: int = 32
    """Tokens decoded per block; eval block 16-32 in the paper
    (may differ from the training block)."""
    threshold: float = 0.9
    """Commit every masked position whose confidence >= threshold (Fast-dLLM; paper: 0.9).
    In (0, 1]."""
    max_new_tokens: int = 256
    """Length limit; the last block is cut short when it is not a multiple of `block_size`."""
    sub_block_size: Optional[int] = None
    """Fast-dLLM v2 (8): only the first incomplete sub-block may commit.
    Must divide `block_size`."""
    temperature: float = 0.0
    """0: greedy argmax, confidence = max prob.
    >0: sample, confidence = prob of the sampled token."""
    top_p: float = 1.0
    """Nucleus mass kept when sampling. In (0, 1]."""
    policy: Literal["threshold", "factor", "fixed"] = "threshold"
    """threshold | factor (Fast-dLLM: commit the largest n with (n + 1) * (1 - c_n) < factor) |
    fixed (commit exactly `tokens_per_pass` most confident tokens per pass: LLaDA / Dream "steps",
    a known TPF)."""
    factor: float = 1.0
    """The factor policy's budget; larger commits more per pass."""
    tokens_per_pass: int = 2
    """The fixed policy's tokens per pass (the last pass of a block commits what is left)."""
    one_token_per_forward: bool = False
    """Deprecated alias of `policy=fixed, tokens_per_pass=1`
    (one line says so; the setting then means that)."""
    use_cache: bool = True
    """Deprecated alias: false is `cache=none`."""
    cache: Literal["auto", "static", "dynamic", "none"] = "auto"
    """static: transformers' StaticCache, preallocated once and written in place |
    dynamic: DynamicCache (grows by concatenation; the reference the static cache is tested
    against) | auto: static, except for mode=speculative, whose per-row holes reserve
    (max_new_tokens + 1) x block_size slots that a static cache would allocate and attend over in
    every forward (measured: BENCHMARKS.md) | none: no cache, every pass forwards the whole
    sequence (slow, the same tokens: the correctness reference)."""

    early_exit: bool = True
    """Stop a row once its EOS is committed with nothing masked before it (or at a stop string),
    mid-block, and drop it from the batch.
    False: finish the block holding EOS first (Fast-dLLM v2's accounting)."""
    compile: bool = False
    """torch.compile the per-pass forward (CUDA: mode reduce-overhead, i.e. CUDA graphs). Forwards
    whose shape is new each time run uncompiled: the prompt's, and every pass of the no-cache
    reference (it re-forwards a growing prefix).
    Pays off on a GPU at batch 1; on CPU measure first (BENCHMARKS.md)."""
    shift: bool = False
    """Dream-style checkpoints: the logit at i-1 predicts token i
    (must match training's `objective.shift`)."""
    speculative_form: Literal["fused", "separate", "branched"] = "fused"
    """mode=speculative only.
    fused: one forward per step verifies the last draft (causal) and drafts the next block (its
    [MASK]s after the drafts), up to block_size tokens per forward; a row that rejects a draft has
    none for its next step |
    separate: a diffusion draft forward, then a causal verify forward (two per step, up to
    block_size / 2 tokens per forward) |
    branched: fused, with a noisy block for each count of drafts a row may accept, so every step
    has a draft (block_size x (block_size - 1) more query tokens a forward)."""
    speculative_branches: Optional[int] = None
    """speculative_form=branched only: noisy blocks a forward. None: one per acceptance count
    (block_size). Fewer: each row drafts after the counts its drafts' confidences make most likely
    (each draft taken as accepted with its own probability); a row that accepts another count has
    no draft for its next step, as in the fused form. Where each query token costs compute (a CPU
    without AMX) two of four blocks are faster: 12 query tokens instead of 20, and the accepted
    count among the two on ~80% of steps (BENCHMARKS.md §14)."""

    def __post_init__(self) -> None:
        if self.one_token_per_forward:
            deprecated("decode.one_token_per_forward=true",
                       "decode.policy=fixed decode.tokens_per_pass=1")
            self.policy, self.tokens_per_pass, self.one_token_per_forward = "fixed", 1, False
        if not self.use_cache and self.cache != "none":
            deprecated("decode.use_cache=false", "decode.cache=none")
            self.cache = "none"
        self.use_cache = self.cache != "none"
        check_choices(self, "decode.")
        check_block_size(self.block_size, key="decode.block_size")
        check(0 < self.threshold <= 1, "decode.threshold", self.threshold, "must be in (0, 1]")
        check_positive_int("decode.max_new_tokens", self.max_new_tokens)
        if self.sub_block_size is not None:
            allowed = divisors(self.block_size)
            check(self.sub_block_size in allowed, "decode.sub_block_size", self.sub_block_size,
                  f"must divide decode.block_size={self.block_size}", allowed)
        check(self.temperature >= 0, "decode.temperature", self.temperature,
              "must be >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "decode.top_p", self.top_p, "must be in (0, 1]")
        check(self.factor > 0, "decode.factor", self.factor, "must be > 0")
        check_positive_int("decode.tokens_per_pass", self.tokens_per_pass)
        if self.mode == "speculative":
            check(self.block_size >= 2, "decode.block_size", self.block_size,
                  "must be >= 2 with decode.mode=speculative (it drafts block_size - 1 tokens)")
            check(self.use_cache, "decode.use_cache", self.use_cache,
                  "decode.mode=speculative verifies over the KV cache; "
                  "allowed: true (cache auto, static, dynamic)")
            check(self.temperature == 0, "decode.temperature", self.temperature,
                  "decode.mode=speculative is greedy (its output is the AR mode's argmax); "
                  "allowed: 0")
        if self.speculative_branches is not None:
            check_positive_int("decode.speculative_branches", self.speculative_branches)
            check(self.speculative_branches <= self.block_size, "decode.speculative_branches",
                  self.speculative_branches,
                  f"at most one block per acceptance count (block_size={self.block_size})",
                  list(range(1, self.block_size + 1)))
            check(self.speculative_form == "branched", "decode.speculative_branches",
                  self.speculative_branches,
                  f"only with decode.speculative_form=branched (is {self.speculative_form})",
                  "none (null) with fused or separate")

    @property
    def speculative_label(self) -> str:
        """The speculative form as a stats line shows it: `fused`, `branched, 2 blocks`."""
        m = self.speculative_branches
        return self.speculative_form + (f", {m} block{'s' * (m > 1)}" if m else "")

    @classmethod
    def overrides(cls, text: str, *, key: str = "decoder") -> tuple[tuple[str, Any], ...]:
        """`"policy=factor factor=1.5"` -> (("policy", "factor"), ("factor", 1.5)): fields of this
        dataclass, values read as YAML scalars, checked by building the setting
        (one line naming the bad part)."""
        allowed = [f.name for f in dataclasses.fields(cls) if f.name != "max_new_tokens"]
        parts = text.split()
        for part in parts:
            check("=" in part, key, text, "each part is field=value",
                  "e.g. policy=factor factor=1.5")
            name = part.split("=", 1)[0].strip()
            check(name in allowed, key, text, f"unknown decoder field {name!r}", allowed)
        # values typed as in YAML
        pairs = list(OmegaConf.to_container(OmegaConf.from_dotlist(parts)).items())
        check(bool(pairs), key, text, "empty", "e.g. policy=factor factor=1.5")
        try:
            cls(**dict(pairs))
        except ConfigError as err:
            raise ConfigError(f"{key}={text!r}: {err}") from None
        return tuple(pairs)

    @property
    def static_cache(self) -> bool:
        """Whether decoding runs over a StaticCache (`cache` with `auto` resolved)."""
        auto_static = self.cache == "auto" and self.mode != "speculative"
        return self.use_cache and (self.cache == "static" or auto_static)
