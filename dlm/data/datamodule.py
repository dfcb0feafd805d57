"""LightningDataModule: packed splits from `dlm.data.sources`, noised in the collate.

With `data.streaming` each rank reads its own part of the stream and the train loader is
torchdata's `StatefulDataLoader`, whose position Lightning keeps in checkpoints. The collate samples
the per-block mask, so every epoch sees fresh noise; under a block-size schedule the noise is drawn
in `on_before_batch_transfer`, at the stage of the step that uses the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import torch
from datasets import Dataset, DatasetDict, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from dlm.data.batch import TrainBatch
from dlm.data.chat import chat_format_of
from dlm.data.sources import (
    AnyDataset,
    check_columns,
    check_source,
    column_names,
    load_raw,
    tokenize_and_pack,
)
from dlm.data.synthetic import synthetic_dir
from dlm.settings import SYNTHETIC, ConfigError, ExperimentConfig, MaskingConfig
from dlm.tensor import patterns
from dlm.tensor.masking import complementary, sample_mask
from dlm.tensor.patterns import Pattern


@dataclass
class DiffusionCollator:
    """Stacks packed rows and applies the masking: a `TrainBatch`, exactly what the step consumes
    (position ids are the pattern's, built with the mask). With `complementary`, the batch is
    doubled with the complementary mask."""

    pattern: Pattern
    """At the configured block size (a schedule's stage resizes it per batch)."""
    mask_token_id: int
    masking: MaskingConfig
    noise: bool = True
    """False: stack only; the DataModule noises the batch when Lightning consumes it
    (`finish`): the noise generator is then saved in checkpoints, and a block-size schedule's stage
    is the step's."""

    def __call__(self, rows: list[dict[str, Any]]) -> TrainBatch | dict[str, torch.Tensor]:
        batch = {"input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long),
                 "eligible": torch.tensor([r["eligible"] for r in rows], dtype=torch.bool)}
        if "document_ids" in rows[0]:
            batch["document_ids"] = torch.tensor([r["document_ids"] for r in rows],
                                                 dtype=torch.long)
        return self.finish(batch) if self.noise else batch

    def finish(self, stacked: dict[str, torch.Tensor], block_size: int | None = None,
               generator: torch.Generator | None = None) -> TrainBatch:
        """The training batch of stacked rows: noised (diffusion patterns, from `generator`, at
        `block_size`: a schedule's stage, which the loss must use too)."""
        ids, eligible, docs = stacked["input_ids"], stacked["eligible"], stacked.get("document_ids")
        batch = TrainBatch(ids, eligible, block_size=block_size)
        if not self.pattern.autoregressive:
            batch = self._noise(ids, eligible, block_size or self.pattern.block_size, generator)
            batch.block_size = block_size
        if docs is not None:
            batch.document_ids = docs.repeat(batch.input_ids.shape[0] // ids.shape[0], 1)
        return batch

    def _noise(self, ids: torch.Tensor, eligible: torch.Tensor, block_size: int,
               generator: torch.Generator | None = None) -> TrainBatch:
        m = self.masking
        sample = sample_mask(ids.shape[0], ids.shape[1], block_size, m.strategy, m.half_life,
                             generator=generator, eligible=eligible, eps=max(m.eps, m.t_min))
        if m.complementary:
            other = complementary(sample, eligible)
            sample = type(sample)(*(torch.cat([a, b]) for a, b in zip(sample, other)))
            ids, eligible = ids.repeat(2, 1), eligible.repeat(2, 1)
        noised = torch.where(sample.mask, self.mask_token_id, ids)
        return TrainBatch(ids, eligible, noised, sample.mask, sample.num_masked,
                          sample.num_eligible)


class ConsumedPositionLoader(StatefulDataLoader):
    """A `StatefulDataLoader` whose saved state is the position after the last batch a step
    consumed.

    A stream has no length, so Lightning fetches one batch ahead, and the loader's own state is one
    batch past the step a checkpoint means; `consumed()` (the DataModule's record of what the step
    took) answers instead, so Lightning saves and restores the right position through its usual
    loader state."""

    def __init__(self, *args: Any, consumed: Callable[[], dict[str, Any] | None],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumed = consumed

    def state_dict(self) -> dict[str, Any]:
        position = self._consumed()
        return super().state_dict() if position is None else position

    def fetched_state_dict(self) -> dict[str, Any]:
        """The position after the last batch fetched (ahead of the step)."""
        return super().state_dict()


class DiffusionDataModule(L.LightningDataModule):
    """Train/val packed splits from `cfg.data`, noised per `cfg.masking` in the collate."""

    def __init__(self, cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase,
                 mask_token_id: int) -> None:
        super().__init__()
        check_source(cfg.data)
        if cfg.data.chat_template or cfg.data.messages_field:
            # a tokenizer without a template fails here, before any data is read
            chat_format_of(tokenizer)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.collator = DiffusionCollator(patterns.of(cfg.attention), mask_token_id, cfg.masking)
        self.train_noise = torch.Generator().manual_seed(cfg.seed)
        self.val_noise = torch.Generator()
        self._val_index = 0
        self._stream_states: tuple[Any, Any] = (None, None)
        self.train_set: AnyDataset | None = None
        self.val_set: AnyDataset | None = None

    def prepare_data(self) -> None:
        """Rank 0 first: fills the datasets cache (or writes the synthetic files a stream reads) for
        setup()."""
        d = self.cfg.data
        if not d.streaming:
            self._build()
        elif d.path == SYNTHETIC:
            synthetic_dir(d)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            build = self._build_stream if self.cfg.data.streaming else self._build
            self.train_set, self.val_set = build()

    def _build(self) -> tuple[Dataset, Dataset]:
        d = self.cfg.data
        raw = load_raw(d, d.train_split)
        check_columns(column_names(raw), d)
        if d.val_split:
            splits = DatasetDict(train=raw, test=load_raw(d, d.val_split))
        else:
            if len(raw) < 2:
                raise ConfigError(f"data.path={d.path!r}: {len(raw)} row(s); "
                                  "need at least 2 to hold out a validation split")
            test_size = max(d.val_fraction, 1 / len(raw))
            splits = raw.train_test_split(test_size=test_size, seed=self.cfg.seed)
        bs = self.cfg.attention.padding_block_size()
        train, val = (tokenize_and_pack(splits[s], self.tokenizer, d, block_size=bs)
                      for s in ("train", "test"))
        if len(train) == 0 or len(val) == 0:
            raise ConfigError(f"data.max_length={d.max_length}: longer than all packed data "
                              f"({len(train)} train / {len(val)} val chunks); "
                              "use a shorter length or more data")
        return train, val

    def _build_stream(self) -> tuple[IterableDataset, IterableDataset]:
        """Validation is the head of the train stream (or `val_split`); each rank trains on its own
        part."""
        d = self.cfg.data
        raw = load_raw(d, d.train_split)
        check_columns(column_names(raw), d)
        train, val = ((raw, load_raw(d, d.val_split)) if d.val_split
                      else (raw.skip(d.val_rows), raw.take(d.val_rows)))
        world = self.trainer.world_size if self.trainer else 1
        # every rank validates on the same rows, so no rank is left without a batch
        if world > 1:
            train = split_dataset_by_node(train, rank=self.trainer.global_rank, world_size=world)
        train = train.shuffle(seed=self.cfg.seed, buffer_size=d.shuffle_buffer)
        bs = self.cfg.attention.padding_block_size()
        train, val = (tokenize_and_pack(s, self.tokenizer, d, block_size=bs) for s in (train, val))
        if next(iter(val), None) is None:
            held_out = (f"split {d.val_split!r}" if d.val_split
                        else f"data.val_rows={d.val_rows} rows")
            raise ConfigError(f"data.max_length={d.max_length}: longer than the packed validation "
                              f"stream ({held_out}); use a shorter length or more rows")
        return train, val

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: AnyDataset, *, shuffle: bool) -> DataLoader:
        """torchdata's `StatefulDataLoader`: Lightning keeps its position (the sampler's permutation
        and count, or the stream's) in every checkpoint. Each loader has its own generator, so
        creating an iterator draws nothing from the global RNG (which dropout uses). Under a Trainer
        the collate only stacks; the noise is drawn when Lightning consumes the batch
        (`on_before_batch_transfer`), not when a loader prefetches it."""
        d = self.cfg.data
        stream = isinstance(dataset, IterableDataset)
        collate = self.collator
        # a stage is known only at the step
        if self.trainer is not None or self.cfg.attention.block_size_schedule:
            collate = dataclasses.replace(self.collator, noise=False)
        generator = torch.Generator().manual_seed(self.cfg.seed + (0 if shuffle else 1))
        return ConsumedPositionLoader(dataset, batch_size=d.batch_size,
                                      shuffle=shuffle and not stream, drop_last=shuffle,
                                      num_workers=d.num_workers, collate_fn=collate,
                                      generator=generator, persistent_workers=d.num_workers > 0,
                                      consumed=self.stream_position if shuffle else lambda: None)

    # -- noise at consumption, its generators in every checkpoint (exact resume) -------------------
    def on_before_batch_transfer(self, batch: TrainBatch | dict[str, torch.Tensor],
                                 dataloader_idx: int) -> TrainBatch:
        """Training batches draw from `train_noise` (saved in checkpoints); each validation run
        redraws the same noise (`val_noise` reseeded per batch index), so val/loss compares steps
        on equal terms. The loader runs ahead (prefetch, workers), so only here is the step known:
        a block-size schedule's stage."""
        if isinstance(batch, TrainBatch):  # noised already (a loader built without a Trainer)
            return batch
        a = self.cfg.attention
        block = a.block_size_at(self.trainer.global_step if self.trainer is not None else 0) \
            if a.block_size_schedule else None
        if self.trainer is not None and self.trainer.training:
            self._val_index = 0
            self._record_stream_position()
            return self.collator.finish(batch, block, self.train_noise)
        self.val_noise.manual_seed(self.cfg.seed * 1_000_003 + self._val_index)
        self._val_index += 1
        return self.collator.finish(batch, block, self.val_noise)

    def _record_stream_position(self) -> None:
        """A stream has no length, so Lightning fetches one batch ahead and the loader's own state
        is one batch past the step being trained; keep the state of one step earlier, which is the
        one a checkpoint means."""
        loader = self.trainer.train_dataloader
        streaming = isinstance(self.train_set, IterableDataset)
        if streaming and isinstance(loader, ConsumedPositionLoader):
            self._stream_states = (self._stream_states[1],
                                   (self.trainer.current_epoch, loader.fetched_state_dict()))

    def stream_position(self) -> dict[str, Any] | None:
        """The train stream's state after the last trained batch
        (None: not a stream, or not known yet)."""
        before = self._stream_states[0]
        if before is None or self.trainer is None:
            return None
        return before[1] if before[0] == self.trainer.current_epoch else None

    def state_dict(self) -> dict[str, Any]:
        return {"train_noise": self.train_noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_noise" in state:
            self.train_noise.set_state(state["train_noise"])
