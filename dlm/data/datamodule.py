"""LightningDataModule: load text with `datasets`, tokenize, pack, and noise each batch in the collate.

Rows become ``ids + [EOS]`` (SFT rows: ``prompt ids + response ids + [EOS]``, only the response and EOS
eligible for noise and loss), optionally padded with EOS to a block multiple so no block spans two
documents (Fast-dLLM v2), then concatenated and cut into `max_length` chunks. Tokenizing and packing go
through `Dataset.map`, so `datasets` caches them. With `data.streaming` the same map functions run
lazily on an `IterableDataset` (nothing is downloaded whole), each rank reads its own part of the stream,
and the train loader is torchdata's `StatefulDataLoader`, whose position Lightning keeps in checkpoints.
The collate samples the per-block mask, so every epoch sees fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from dlm.data import synthetic
from dlm.tensor.attention import position_ids
from dlm.settings.experiment import ConfigError, DataConfig, ExperimentConfig, MaskingConfig
from dlm.tensor.masking import complementary, sample_mask

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
SYNTHETIC = "synthetic"
AnyDataset = Dataset | IterableDataset


def synthetic_dir(cfg: DataConfig, seed: int = 0) -> Path:
    """Folder of the generated task (train/test jsonl), written once and reused by every later command."""
    root = Path(cfg.cache_dir) / f"synthetic-n{cfg.synthetic_size}-max{cfg.synthetic_max_number}-s{seed}"
    if not (root / "test.jsonl").is_file():
        synthetic.write_splits(root, train_size=cfg.synthetic_size, seed=seed, max_number=cfg.synthetic_max_number)
    return root


def check_source(cfg: DataConfig) -> None:
    """Fail in one line on a local path that does not exist, before anything is loaded."""
    if cfg.path == SYNTHETIC:
        return
    path = Path(cfg.path)
    looks_local = cfg.path.startswith((".", "/", "~")) or path.suffix in LOCAL_BUILDERS
    if looks_local and not path.expanduser().exists():
        raise ConfigError(f"data.path={cfg.path!r}: no such file or folder; allowed: a local file/folder, an HF dataset id, {SYNTHETIC}")


def load_raw(cfg: DataConfig, split: str) -> AnyDataset:
    """One split of the raw dataset: synthetic, a local file or folder, or a hub id (a stream if `streaming`)."""
    check_source(cfg)
    stream = cfg.streaming
    if cfg.path == SYNTHETIC:
        root = synthetic_dir(cfg)
        files = {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")}
        return load_dataset("json", data_files=files, split=split, streaming=stream)
    path = Path(cfg.path).expanduser()
    try:
        if path.is_file():
            return load_dataset(LOCAL_BUILDERS.get(path.suffix, "text"), data_files={split: str(path)}, split=split, streaming=stream)
        return load_dataset(str(path) if path.is_dir() else cfg.path, cfg.name, split=split, streaming=stream)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"data.path={cfg.path!r}: cannot load split {split!r} ({first})") from None


def tokenize_rows(batch: dict[str, list], *, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, block_size: int) -> dict[str, list]:
    """Batched map fn: ids and per-token `eligible` flags (1 = may be noised and scored)."""
    eos = tokenizer.eos_token_id
    if cfg.prompt_field and cfg.response_field:
        prompts = tokenizer(batch[cfg.prompt_field], add_special_tokens=False)["input_ids"]
        responses = tokenizer(batch[cfg.response_field], add_special_tokens=False)["input_ids"]
        docs = [(p + r + [eos], [0] * len(p) + [1] * (len(r) + 1)) for p, r in zip(prompts, responses)]
    else:
        texts = tokenizer(batch[cfg.text_field], add_special_tokens=False)["input_ids"]
        docs = [(t + [eos], [1] * (len(t) + 1)) for t in texts]
    if cfg.pad_to_block:
        # EOS padding stays eligible: the model must learn to fill a block's tail with EOS to stop.
        docs = [(ids + [eos] * (-len(ids) % block_size), el + [1] * (-len(ids) % block_size)) for ids, el in docs]
    return {"input_ids": [d[0] for d in docs], "eligible": [d[1] for d in docs]}


def pack_rows(batch: dict[str, list], *, max_length: int) -> dict[str, list]:
    """Batched map fn: concatenate documents and cut fixed-length chunks (the remainder is dropped)."""
    out: dict[str, list] = {}
    for key in ("input_ids", "eligible"):
        flat = [x for row in batch[key] for x in row]
        usable = len(flat) - len(flat) % max_length
        out[key] = [flat[i : i + max_length] for i in range(0, usable, max_length)]
    return out


def column_names(raw: AnyDataset) -> list[str]:
    """A stream may not know its features before it is read: then its first row names the columns."""
    if raw.column_names is not None:
        return list(raw.column_names)
    return list(next(iter(raw), {}).keys())


def check_columns(columns: list[str], cfg: DataConfig) -> None:
    fields = {"data.prompt_field": cfg.prompt_field, "data.response_field": cfg.response_field}
    if not (cfg.prompt_field and cfg.response_field):
        fields = {"data.text_field": cfg.text_field}
    for key, name in fields.items():
        if name not in columns:
            raise ConfigError(f"{key}={name!r}: no such column; allowed: {', '.join(columns)}")


def tokenize_and_pack(raw: AnyDataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, *, block_size: int) -> AnyDataset:
    """Eager and cached for a `Dataset`, lazy for a stream (which takes no progress-bar `desc`)."""
    stream = isinstance(raw, IterableDataset)
    tokenized = raw.map(
        tokenize_rows, batched=True, remove_columns=column_names(raw),
        fn_kwargs={"tokenizer": tokenizer, "cfg": cfg, "block_size": block_size}, **({} if stream else {"desc": "tokenize"}),
    )
    return tokenized.map(pack_rows, batched=True, batch_size=1000, fn_kwargs={"max_length": cfg.max_length},
                         **({} if stream else {"desc": "pack"}))


@dataclass
class DiffusionCollator:
    """Stacks packed rows and applies the masking: the batch carries everything the loss needs.

    Keys: input_ids (x_0), eligible, position_ids; for diffusion patterns also noised_ids (x_t), mask, t,
    num_masked, num_eligible. With `complementary`, the batch is doubled with the complementary mask.
    """

    pattern: str
    block_size: int
    mask_token_id: int
    masking: MaskingConfig

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        eligible = torch.tensor([r["eligible"] for r in rows], dtype=torch.bool)
        batch = {"input_ids": ids, "eligible": eligible}
        if self.pattern != "causal":
            batch = self._noise(ids, eligible)
        batch["position_ids"] = position_ids(self.pattern, *batch["input_ids"].shape)
        return batch

    def _noise(self, ids: torch.Tensor, eligible: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.masking
        sample = sample_mask(ids.shape[0], ids.shape[1], self.block_size, m.strategy, m.half_life,
                             eligible=eligible, eps=m.eps)
        if m.complementary:
            other = complementary(sample, eligible)
            sample = type(sample)(*(torch.cat([a, b]) for a, b in zip(sample, other)))
            ids, eligible = ids.repeat(2, 1), eligible.repeat(2, 1)
        noised = torch.where(sample.mask, self.mask_token_id, ids)
        return {"input_ids": ids, "eligible": eligible, "noised_ids": noised, "mask": sample.mask, "t": sample.t,
                "num_masked": sample.num_masked, "num_eligible": sample.num_eligible}


class DiffusionDataModule(L.LightningDataModule):
    """Train/val packed splits from `cfg.data`, noised per `cfg.masking` in the collate."""

    def __init__(self, cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, mask_token_id: int) -> None:
        super().__init__()
        check_source(cfg.data)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.collator = DiffusionCollator(cfg.attention.pattern, cfg.attention.block_size, mask_token_id, cfg.masking)
        self.train_set: AnyDataset | None = None
        self.val_set: AnyDataset | None = None

    def prepare_data(self) -> None:
        """Rank 0 first: fills the datasets cache (or writes the synthetic files a stream reads) for setup()."""
        d = self.cfg.data
        if not d.streaming:
            self._build()
        elif d.path == SYNTHETIC:
            synthetic_dir(d)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self._build_stream() if self.cfg.data.streaming else self._build()

    def _build(self) -> tuple[Dataset, Dataset]:
        d = self.cfg.data
        raw = load_raw(d, d.train_split)
        check_columns(column_names(raw), d)
        if d.val_split:
            splits = DatasetDict(train=raw, test=load_raw(d, d.val_split))
        else:
            if len(raw) < 2:
                raise ConfigError(f"data.path={d.path!r}: {len(raw)} row(s); need at least 2 to hold out a validation split")
            splits = raw.train_test_split(test_size=max(d.val_fraction, 1 / len(raw)), seed=self.cfg.seed)
        bs = self.cfg.attention.block_size
        train, val = (tokenize_and_pack(splits[s], self.tokenizer, d, block_size=bs) for s in ("train", "test"))
        if len(train) == 0 or len(val) == 0:
            raise ConfigError(f"data.max_length={d.max_length}: longer than all packed data ({len(train)} train / {len(val)} val chunks); use a shorter length or more data")
        return train, val

    def _build_stream(self) -> tuple[IterableDataset, IterableDataset]:
        """Validation is the head of the train stream (or `val_split`); each rank trains on its own part."""
        d = self.cfg.data
        raw = load_raw(d, d.train_split)
        check_columns(column_names(raw), d)
        train, val = (raw, load_raw(d, d.val_split)) if d.val_split else (raw.skip(d.val_rows), raw.take(d.val_rows))
        world = self.trainer.world_size if self.trainer else 1
        if world > 1:  # every rank validates on the same rows, so no rank is left without a batch
            train = split_dataset_by_node(train, rank=self.trainer.global_rank, world_size=world)
        train = train.shuffle(seed=self.cfg.seed, buffer_size=d.shuffle_buffer)
        bs = self.cfg.attention.block_size
        train, val = (tokenize_and_pack(s, self.tokenizer, d, block_size=bs) for s in (train, val))
        if next(iter(val), None) is None:
            held_out = f"split {d.val_split!r}" if d.val_split else f"data.val_rows={d.val_rows} rows"
            raise ConfigError(f"data.max_length={d.max_length}: longer than the packed validation stream ({held_out}); use a shorter length or more rows")
        return train, val

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: AnyDataset, *, shuffle: bool) -> DataLoader:
        """A stream is shuffled upstream (buffer) and its loader is stateful, so resume continues the stream."""
        d = self.cfg.data
        stream = isinstance(dataset, IterableDataset)
        loader = StatefulDataLoader if stream else DataLoader
        return loader(dataset, batch_size=d.batch_size, shuffle=shuffle and not stream, drop_last=shuffle,
                      num_workers=d.num_workers, collate_fn=self.collator, persistent_workers=d.num_workers > 0)
