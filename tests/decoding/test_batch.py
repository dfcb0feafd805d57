"""Active rows of a generate call: finished rows leave with their tokens, forwards counted per row."""

from __future__ import annotations

import torch

from dlm.decoding.batch import ActiveRows


def test_dropped_rows_keep_their_tokens_under_their_original_index():
    rows = ActiveRows(torch.arange(12).view(3, 4), prompt_len=1)
    rows.prev = torch.zeros(3, 5)
    rows.count_forward()
    keep = rows.drop([False, True, False], end=3)
    assert keep.tolist() == [0, 2] and rows.ids == [0, 2] and rows.seq.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert rows.tokens[1] == [5, 6] and rows.prev.shape == (2, 5)
    rows.count_forward([1])  # only the row at position 1 of the active batch (original row 2) took part
    rows.drop([True, True], end=4)
    assert rows.tokens == [[1, 2, 3], [5, 6], [9, 10, 11]] and not rows.active
    assert rows.forwards == [1, 1, 2] and rows.nfe == 2


def test_dropping_nothing_keeps_every_row():
    rows = ActiveRows(torch.zeros(2, 3, dtype=torch.long), prompt_len=1)
    assert rows.drop([False, False], end=2).tolist() == [0, 1] and rows.ids == [0, 1]
