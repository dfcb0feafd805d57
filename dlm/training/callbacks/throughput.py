"""Decode a few prompts with the in-training model every N steps and log tokens/s, TPF and NFE.

Tracks how parallel decoding develops during conversion (TPF rises as the model grows confident)
without stopping the run: any failure is reported as a warning and training goes on.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from transformers import PreTrainedModel

from dlm.data.prompts import load_prompts
from dlm.decoding.engine import MASK_IMPLEMENTATIONS
from dlm.measurement.bench import check_positions
from dlm.measurement.grid import Setting, Target, encode_batches, measure
from dlm.settings import SYNTHETIC, DecodeConfig, check
from dlm.settings.errors import check_positive_int

log = logging.getLogger(__name__)


@contextmanager
def decoding_mode(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Eval mode and a dense-mask attention kernel for the decoder, both restored afterwards.

    A model trained on CUDA runs flex attention, which takes only a BlockMask; the decoder passes a
    dense 4-D mask, so it switches to sdpa for the bench and back for training.
    """
    was_training, impl = model.training, model.config._attn_implementation
    if impl not in MASK_IMPLEMENTATIONS:
        model.set_attn_implementation("sdpa")
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)


class ThroughputCallback(L.Callback):
    """Every `every_n_steps` optimizer steps and at train end, on rank 0, log
    `bench/tokens_per_sec`, `bench/tpf`, `bench/nfe` (and `bench/exact_match` for scored prompts) at
    the global step.

    A `causal` run (AR pretraining) is measured with the AR decoder, so TPF is 1 there. `prompts`:
    `synthetic` (the task's test split, from the run's `data` config), a JSONL file, or a list of
    strings. Skipped under sharded strategies (FSDP, DeepSpeed): rank 0 alone cannot run a sharded
    forward.
    """

    def __init__(self, every_n_steps: int, *, prompts: str | Path | Sequence[str] = SYNTHETIC,
                 num_prompts: int = 8, max_new_tokens: int = 64,
                 threshold: float = DecodeConfig.threshold, batch_size: int = 4,
                 block_size: int | None = None,
                 ignore_eos: bool = False) -> None:
        for key, value in (("every_n_steps", every_n_steps), ("num_prompts", num_prompts),
                           ("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                           ("block_size", block_size)):
            check_positive_int(f"throughput.{key}", value, optional=key == "block_size")
        check(0 < threshold <= 1, "throughput.threshold", threshold, "must be in (0, 1]")
        self.every_n_steps, self.prompts, self.num_prompts = every_n_steps, prompts, num_prompts
        self.max_new_tokens, self.threshold, self.batch_size = max_new_tokens, threshold, batch_size
        self.block_size, self.ignore_eos = block_size, ignore_eos
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._maybe_bench(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_bench(trainer, pl_module)

    def _maybe_bench(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Once per global step (batch end fires per micro-batch under gradient accumulation)."""
        if trainer.global_step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = trainer.global_step
        if any(name in type(trainer.strategy).__name__ for name in ("FSDP", "DeepSpeed")):
            return
        try:
            metrics = self.bench(pl_module)
        except Exception as err:  # a failed bench must never end a training run
            rank_zero_warn(f"ThroughputCallback: bench at step {trainer.global_step} failed, "
                           f"training goes on: {type(err).__name__}: {err}")
            log.debug("bench failure", exc_info=True)
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def bench(self, pl_module: L.LightningModule) -> dict[str, float]:
        """One measurement of the module as it is now; the module's train/eval mode is restored."""
        cfg = pl_module.cfg
        prompts = load_prompts(self.prompts, limit=self.num_prompts, data=cfg.data)
        scored = all(p.answer is not None for p in prompts)
        method = "ar" if pl_module.pattern.autoregressive else "dlm"
        with decoding_mode(pl_module.model) as model:
            block_size = self.block_size or cfg.attention.block_size_at(pl_module.global_step)
            target = Target(model, pl_module.tokenizer, pl_module.mask_token_id, block_size,
                            cfg.objective.shift, pattern=pl_module.pattern)
            check_positions("the training model", target, prompts, self.max_new_tokens)
            batches = encode_batches(target.tokenizer, prompts, self.batch_size, target.device)
            setting = Setting(method, self.batch_size, None if method == "ar" else self.threshold)
            m = measure(target, setting, batches, max_new_tokens=self.max_new_tokens,
                        ignore_eos=self.ignore_eos, scored=scored)
        metrics = {"bench/tokens_per_sec": m.tokens_per_sec[0], "bench/tpf": m.tpf,
                   "bench/nfe": m.nfe_total / m.calls}
        if m.exact_match is not None:
            metrics["bench/exact_match"] = m.exact_match
        return metrics
