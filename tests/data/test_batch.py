"""The training batch is a typed object: what the step consumes, moved to a device field by field."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from dlm.data.batch import TrainBatch


def test_an_ar_batch_has_no_noise_fields():
    batch = TrainBatch(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    assert batch.noised_ids is None and batch.mask is None and batch.block_size is None


def test_lightning_moves_its_tensors_and_keeps_the_rest():
    batch = TrainBatch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool),
                       noised_ids=torch.ones(1, 4, dtype=torch.long), block_size=2)
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, TrainBatch) and moved.block_size == 2 and torch.equal(moved.noised_ids, batch.noised_ids)
