"""`GenerationOutput.tokens_per_forward`: mean generated tokens per row over the decoding forwards."""

from __future__ import annotations

from dlm.decoding.output import GenerationOutput


def test_tokens_per_forward_is_mean_tokens_over_nfe():
    assert GenerationOutput(tokens=[[1, 2, 3], [1]], nfe=2, num_generated=[3, 1]).tokens_per_forward == 1.0


def test_one_ar_row_gives_one_token_per_forward():
    assert GenerationOutput(tokens=[[5, 6, 7, 8]], nfe=4, num_generated=[4]).tokens_per_forward == 1.0


def test_parallel_commits_give_more_than_one_token_per_forward():
    out = GenerationOutput(tokens=[[1] * 8, [2] * 4], nfe=3, num_generated=[8, 4])
    assert out.tokens_per_forward == 2.0  # (8 + 4) / 2 rows / 3 forwards


def test_zero_forwards_give_zero_tokens_per_forward_instead_of_dividing_by_zero():
    assert GenerationOutput(tokens=[[]], nfe=0, num_generated=[0]).tokens_per_forward == 0.0
    assert GenerationOutput(tokens=[[], []], nfe=0, num_generated=[0, 0]).tokens_per_forward == 0.0
