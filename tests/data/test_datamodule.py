"""`dlm.data.datamodule`: the collate's noise, splits and batches from synthetic, local and streamed data."""

from __future__ import annotations

import json

import pytest
import torch

from dlm.data.datamodule import DiffusionCollator, DiffusionDataModule
from dlm.settings import ConfigError, load_config
from dlm.tensor import patterns
from dlm.tensor.attention import position_ids


def _cfg(tmp_path, *overrides):
    return load_config("experiments/tiny.yaml", overrides=[
        f"data.cache_dir={tmp_path}/data", "data.synthetic_size=300", "data.max_length=32", "data.batch_size=4",
        "attention.block_size=4", *overrides])


def test_collate_noises_only_eligible_with_mask_token(tmp_path):
    cfg = _cfg(tmp_path)
    collate = DiffusionCollator(patterns.get("block_clean", block_size=4), mask_token_id=1, masking=cfg.masking)
    rows = [{"input_ids": list(range(10, 26)), "eligible": [0] * 6 + [1] * 10} for _ in range(3)]
    torch.manual_seed(0)
    batch = collate(rows)
    assert batch.noised_ids.shape == (3, 16) and batch.num_masked.shape == (3, 4)
    assert not batch.mask[:, :6].any()
    assert torch.equal(batch.noised_ids == 1, batch.mask)
    assert torch.equal(position_ids(collate.pattern, 3, 16)[0], torch.cat([torch.arange(16), torch.arange(16)]))


def test_collate_complementary_doubles_batch_and_covers_every_token(tmp_path):
    cfg = _cfg(tmp_path, "masking.complementary=true")
    collate = DiffusionCollator(patterns.get("block", block_size=4), mask_token_id=1, masking=cfg.masking)
    batch = collate([{"input_ids": list(range(16)), "eligible": [1] * 16} for _ in range(2)])
    assert batch.mask.shape == (4, 16)
    assert torch.equal(batch.mask[:2] ^ batch.mask[2:], torch.ones(2, 16, dtype=torch.bool))


@pytest.mark.parametrize("t_min, all_masked", [(0.9, True), (0.0, False)])
def test_collate_t_min_raises_the_masking_rate(tmp_path, t_min, all_masked):
    """t >= 0.9 masks round(4 t) = 4 of a block's 4 tokens: every block is a draft's all-[MASK] block."""
    cfg = _cfg(tmp_path, f"masking.t_min={t_min}")
    collate = DiffusionCollator(patterns.get("block_clean", block_size=4), mask_token_id=1, masking=cfg.masking)
    torch.manual_seed(0)
    batch = collate([{"input_ids": list(range(10, 42)), "eligible": [1] * 32} for _ in range(8)])
    assert bool(batch.mask.all()) == all_masked


def test_collate_causal_has_no_noise(tmp_path):
    collate = DiffusionCollator(patterns.get("causal", block_size=4), mask_token_id=1, masking=_cfg(tmp_path).masking)
    batch = collate([{"input_ids": [5, 6, 7, 8], "eligible": [1, 1, 1, 1]}])
    assert batch.noised_ids is None and batch.mask is None and batch.num_masked is None


@pytest.mark.parametrize("restart", [True, False])
def test_collate_document_ids_restart_positions_per_document(tmp_path, restart):
    cfg = _cfg(tmp_path, "masking.complementary=true")
    collate = DiffusionCollator(patterns.get("block_clean", block_size=4), mask_token_id=1, masking=cfg.masking)
    docs = [0] * 3 + [1] * 5
    batch = collate([{"input_ids": list(range(8)), "eligible": [1] * 8, "document_ids": docs}])
    assert batch.document_ids.tolist() == [docs, docs]  # doubled with the complementary copy
    half = [0, 1, 2, 0, 1, 2, 3, 4] if restart else list(range(8))
    positions = position_ids(collate.pattern, 2, 8, document_ids=batch.document_ids if restart else None)
    assert positions.tolist() == [half + half] * 2


def test_datamodule_document_mask_batches_carry_document_ids(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, "data.document_mask=true")
    dm = DiffusionDataModule(cfg, tokenizer, mask_token_id=tokenizer.mask_token_id)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    docs = batch.document_ids
    assert docs.shape == (4, 32)
    starts = docs[:, 1:] != docs[:, :-1]
    assert starts.any() and torch.equal(batch.input_ids[:, :-1][starts] == tokenizer.eos_token_id,
                                        torch.ones(int(starts.sum()), dtype=torch.bool))  # a document ends with EOS
    assert (position_ids(dm.collator.pattern, 4, 32, document_ids=docs)[:, 1:32][starts] == 0).all()


def test_schedule_defers_the_noise_to_the_step_and_pads_to_every_stage(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, "attention.block_size_schedule=[[0,2],[100,8]]", "data.pad_to_block=true")
    dm = DiffusionDataModule(cfg, tokenizer, mask_token_id=tokenizer.mask_token_id)
    dm.setup("fit")
    stacked = next(iter(dm.train_dataloader()))
    assert set(stacked) == {"input_ids", "eligible"}  # the loader runs ahead: no noise yet
    batch = dm.on_before_batch_transfer(stacked, 0)  # no trainer: step 0, the first stage
    assert batch.block_size == 2 and batch.num_masked.shape == (4, 16) and batch.noised_ids.shape == (4, 32)
    eos = stacked["input_ids"] == tokenizer.eos_token_id
    assert eos.any()  # documents padded with EOS to multiples of 8 (the lcm of the stages)


def test_datamodule_synthetic_splits_and_batches(tokenizer, tmp_path):
    cfg = _cfg(tmp_path)
    dm = DiffusionDataModule(cfg, tokenizer, mask_token_id=tokenizer.mask_token_id)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape == (4, 32)
    assert len(dm.val_set) > 0 and len(dm.train_set) > len(dm.val_set)
    assert (tmp_path / "data").is_dir()


def test_datamodule_loads_local_jsonl(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": f"Text number {i} about apples."}) + "\n" for i in range(200)))
    cfg = _cfg(tmp_path, f"data.path={path}", "data.text_field=body", "data.prompt_field=null",
               "data.response_field=null", "data.val_fraction=0.1")
    dm = DiffusionDataModule(cfg, tokenizer, mask_token_id=tokenizer.mask_token_id)
    dm.setup("fit")
    assert next(iter(dm.val_dataloader())).input_ids.shape[1] == 32


def test_missing_column_is_named(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    cfg = _cfg(tmp_path, f"data.path={path}", "data.prompt_field=null", "data.response_field=null")
    with pytest.raises(ConfigError, match=r"^data.text_field='text': no such column; allowed: body"):
        DiffusionDataModule(cfg, tokenizer, mask_token_id=1).setup()


def _text(tokenizer, loader) -> str:
    return " ".join(text for batch in loader for text in tokenizer.batch_decode(batch.input_ids))


def test_streaming_holds_out_the_head_and_packs_lazily(tokenizer, tmp_path):
    from datasets import IterableDataset

    path = tmp_path / "rows.jsonl"  # the first 20 rows speak of apples, the rest of pears
    path.write_text("".join(json.dumps({"body": f"Row {i} about {'apples' if i < 20 else 'pears'}."}) + "\n"
                            for i in range(200)))
    cfg = _cfg(tmp_path, f"data.path={path}", "data.text_field=body", "data.prompt_field=null",
               "data.response_field=null", "data.streaming=true", "data.val_rows=20")
    dm = DiffusionDataModule(cfg, tokenizer, mask_token_id=tokenizer.mask_token_id)
    dm.setup("fit")
    assert isinstance(dm.train_set, IterableDataset) and isinstance(dm.val_set, IterableDataset)
    val, train = _text(tokenizer, dm.val_dataloader()), _text(tokenizer, dm.train_dataloader())
    assert "apples" in val and "pears" not in val
    assert "pears" in train and "apples" not in train
    assert next(iter(dm.train_dataloader())).input_ids.shape == (4, 32)


def test_streaming_loader_resumes_from_its_state(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, "data.streaming=true", "data.val_rows=10")
    dm = DiffusionDataModule(cfg, tokenizer, mask_token_id=tokenizer.mask_token_id)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    [next(it) for _ in range(3)]
    state = loader.state_dict()
    expected = next(it).input_ids
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh)).input_ids, expected)


def test_streaming_reshuffles_per_epoch(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, "data.streaming=true", "data.val_rows=10", "data.shuffle_buffer=50")
    dm = DiffusionDataModule(cfg, tokenizer, mask_token_id=tokenizer.mask_token_id)
    dm.setup("fit")
    first = next(iter(dm.train_dataloader())).input_ids
    assert torch.equal(next(iter(dm.train_dataloader())).input_ids, first)  # seeded
    dm.train_set.set_epoch(1)
    assert not torch.equal(next(iter(dm.train_dataloader())).input_ids, first)


def test_streaming_too_long_max_length_is_named(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, "data.streaming=true", "data.val_rows=1", "data.max_length=4096")
    with pytest.raises(ConfigError, match=r"^data.max_length=4096: longer than the packed validation stream "
                                          r"\(data.val_rows=1 rows\)"):
        DiffusionDataModule(cfg, tokenizer, mask_token_id=1).setup()


def test_the_loader_saves_the_position_of_the_last_consumed_batch_not_the_prefetched_one():
    from dlm.data.datamodule import ConsumedPositionLoader

    consumed = {"position": None}
    loader = ConsumedPositionLoader(list(range(10)), batch_size=2, consumed=lambda: consumed["position"])
    it = iter(loader)
    next(it)
    after_one = loader.fetched_state_dict()
    next(it)  # fetched ahead
    assert loader.state_dict() == loader.fetched_state_dict()  # nothing recorded: the loader's own position
    consumed["position"] = after_one
    assert loader.state_dict() == after_one
    fresh = ConsumedPositionLoader(list(range(10)), batch_size=2, consumed=lambda: None)
    fresh.load_state_dict(loader.state_dict())
    assert next(iter(fresh)).tolist() == [2, 3]  # resumes after the consumed batch
