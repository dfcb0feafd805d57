"""The per-forward cost table: one row per query size, q = 1 as the unit, timed on a real tiny model."""

from __future__ import annotations

import pytest

from dlm.measurement.forward_cost import forward_costs
from tests.conftest import make_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_costs_per_query_size_relative_to_one_token(tokenizer):
    model = make_backbone("qwen3", tokenizer).model.eval()
    costs = forward_costs(model, [4, 16], context=32, repeats=2)
    assert [c["query_tokens"] for c in costs] == [1, 4, 16]  # q = 1 is always timed: it is the unit
    assert costs[0]["ratio"] == 1.0 and all(c["context"] == 32 for c in costs)
    assert all(0 < c["ms_min"] <= c["ms"] <= c["ms_max"] for c in costs)
    assert costs[2]["ratio"] > 0
