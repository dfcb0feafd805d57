from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention
from torch.nn.functional import scaled_dot_product_attention
from torch.testing import assert_close
from transformers import DynamicCache

from dlm.decoding.layout import Layout
from dlm.settings import PATTERNS, ConfigError
from dlm.tensor import patterns
from dlm.tensor.attention import (
    additive_mask,
    build_attention_inputs,
    dense_document_mask,
    dense_mask,
    describe,
    document_positions,
    flex_block_mask,
    flex_document_mask,
    position_ids,
)

T, F = True, False


def P(name, block_size=1, clean_context="block"):
    return patterns.get(name, block_size=block_size, clean_context=clean_context)


def decode_mask(query_len: int, cache_len: int, block_size: int):
    """The decoder's mask for a block of `query_len` after `cache_len` cached tokens (no padding)."""
    layout = Layout.build(torch.ones(1, cache_len, dtype=torch.long), query_len, P("block", block_size))
    end = cache_len + query_len
    return layout.mask(cache_len, end, end, (cache_len, end))[0, 0]


CASES = [(p, bs) for p in PATTERNS for bs in (3, 4)]  # odd and even block sizes, L = 12


def _flex_dense_form(block_mask, n: int) -> torch.Tensor:
    """Token-level mask the BlockMask enforces: attend with equal scores to one-hot values."""
    q = torch.zeros(1, 1, n, 8)
    v = torch.eye(n).view(1, 1, n, n)
    out = flex_attention(q, q.new_zeros(1, 1, n, 8), v, block_mask=block_mask)
    return out[0, 0] > 0


@pytest.mark.parametrize("pattern,block_size", CASES)
def test_dense_mask_equals_flex_block_mask(pattern, block_size):
    dense = dense_mask(P(pattern, block_size), 12)
    block_mask = flex_block_mask(P(pattern, block_size), 12, "cpu")
    assert torch.equal(_flex_dense_form(block_mask, dense.shape[0]), dense)


@pytest.mark.parametrize("pattern,block_size", CASES)
def test_uncompiled_flex_matches_sdpa_kernel(pattern, block_size):
    torch.manual_seed(0)
    dense = dense_mask(P(pattern, block_size), 12)
    n = dense.shape[0]
    q, k, v = (torch.randn(2, 4, n, 16) for _ in range(3))
    expected = scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = flex_attention(q, k, v, block_mask=flex_block_mask(P(pattern, block_size), 12, "cpu"))
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_cached_per_shape():
    assert flex_block_mask(P("block", 4), 12, "cpu") is flex_block_mask(P("block", 4), 12, "cpu")


def _logits(model, ids, pattern, block_size, backend="sdpa"):
    seq_len = ids.shape[1] // 2 if patterns.get(pattern).two_halves else ids.shape[1]
    attn = build_attention_inputs(P(pattern, block_size), batch_size=ids.shape[0], seq_len=seq_len,
                                  backend=backend, dtype=model.dtype)
    with torch.no_grad():
        return model(input_ids=ids, **attn.as_kwargs()).logits


def test_block_pattern_hides_later_blocks(backbone):
    ids = torch.randint(5, 300, (1, 12))
    changed = ids.clone()
    changed[0, 9] += 1  # block 2 of size 4
    diff = (_logits(backbone.model, ids, "block", 4) - _logits(backbone.model, changed, "block", 4)).abs().amax(-1)[0]
    assert diff[:8].max() == 0
    assert diff[8:].min() > 0


def test_block_clean_noisy_token_changes_only_its_own_noisy_block(backbone):
    L, bs = 12, 4
    ids = torch.randint(5, 300, (1, 2 * L))
    changed = ids.clone()
    changed[0, 5] += 1  # noisy block 1
    diff = (_logits(backbone.model, ids, "block_clean", bs)
            - _logits(backbone.model, changed, "block_clean", bs)).abs().amax(-1)[0]
    noisy = diff[:L]
    assert noisy[4:8].min() > 0
    assert noisy[:4].max() == 0 and noisy[8:].max() == 0
    assert diff[L:].max() == 0  # the clean half never sees noisy tokens


def test_block_clean_clean_token_changes_only_later_noisy_blocks(backbone):
    L, bs = 12, 4
    ids = torch.randint(5, 300, (1, 2 * L))
    changed = ids.clone()
    changed[0, L + 5] += 1  # clean block 1
    noisy = (_logits(backbone.model, ids, "block_clean", bs)
             - _logits(backbone.model, changed, "block_clean", bs)).abs().amax(-1)[0, :L]
    assert noisy[:8].max() == 0
    assert noisy[8:].min() > 0


@pytest.mark.parametrize("block_size", [3, 4])
def test_kv_cache_block_by_block_equals_full_forward(backbone, block_size):
    L = 12
    ids = torch.randint(5, 300, (2, L))
    full = _logits(backbone.model, ids, "block", block_size)
    cache, pieces = DynamicCache(), []
    with torch.no_grad():
        for start in range(0, L, block_size):
            q_len = min(block_size, L - start)
            mask = decode_mask(q_len, start, block_size)[None, None]
            pos = torch.arange(start, start + q_len).expand(2, -1)
            out = backbone.model(input_ids=ids[:, start:start + q_len], attention_mask=mask, position_ids=pos,
                                 cache=cache, use_cache=True)
            pieces.append(out.logits)
    assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_decode_mask_matches_rows_of_block_mask():
    full = dense_mask(P("block", 4), 12)
    assert torch.equal(decode_mask(4, 8, 4), full[8:12, :12])
    assert torch.equal(decode_mask(3, 5, 4), full[5:8, :8])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_eager_additive_mask_matches_sdpa(tokenizer, pattern):
    from tests.conftest import make_backbone

    sdpa = make_backbone("qwen3", tokenizer, attn_implementation="sdpa", seed=1).model
    eager = make_backbone("qwen3", tokenizer, attn_implementation="eager", seed=1).model
    n = 16 if patterns.get(pattern).two_halves else 8
    ids = torch.randint(5, 300, (2, n))
    assert_close(_logits(eager, ids, pattern, 4, backend="eager"), _logits(sdpa, ids, pattern, 4), atol=1e-5, rtol=1e-5)


def test_additive_mask_values():
    m = additive_mask(torch.tensor([True, False]), torch.float32)
    assert m[0] == 0 and m[1] == torch.finfo(torch.float32).min


def test_block_clean_position_ids_repeat_for_clean_half():
    assert position_ids(P("block_clean"), 1, 3)[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert position_ids(P("block"), 2, 3).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_describe_prints_each_row():
    text = describe(P("block", 2), 4)
    assert text.splitlines()[1].strip().endswith("##..")
    assert len(text.splitlines()) == 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pattern="blok"), r"attention.pattern='blok': unknown pattern; "
                               r"allowed: bidirectional, block, block_clean, block_window, causal"),
        (dict(block_size=0), r"attention.block_size=0: must be a positive integer"),
        (dict(backend="xformers"), r"attention.backend='xformers': unknown backend; allowed: auto"),
        (dict(backend="flex"), r"attention.backend='flex': needs CUDA"),
        (dict(backend="flash"), r"attention.backend='flash': pattern 'block' needs a custom mask"),
    ],
)
def test_bad_attention_input_fails_in_one_line(kwargs, match):
    args = dict(pattern="block", batch_size=1, seq_len=8, block_size=4, backend="sdpa") | kwargs
    with pytest.raises(ConfigError, match=match) as info:
        build_attention_inputs(P(args.pop("pattern"), args.pop("block_size")), **args)
    assert "\n" not in str(info.value)


def test_auto_backend_is_sdpa_on_cpu():
    assert build_attention_inputs(P("block", 4), batch_size=1, seq_len=8).backend == "sdpa"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: full-model flex path")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_full_model_flex_matches_sdpa_on_cuda(tokenizer, pattern):
    from tests.conftest import make_backbone

    sdpa = make_backbone("qwen3", tokenizer, attn_implementation="sdpa", seed=2).model.cuda()
    flex = make_backbone("qwen3", tokenizer, attn_implementation="flex_attention", seed=2).model.cuda()
    ids = torch.randint(5, 300, (2, 256 if patterns.get(pattern).two_halves else 128), device="cuda")
    got = _logits(flex, ids, pattern, 16, backend="flex")
    expected = _logits(sdpa, ids, pattern, 16, backend="sdpa")
    assert_close(got, expected, atol=2e-4, rtol=2e-4)
    seq_len = P(pattern).sequence_length(ids.shape[1])
    loss = flex(input_ids=ids, **build_attention_inputs(P(pattern, 16), batch_size=2, seq_len=seq_len,
                                                        backend="flex",
                                                        device="cuda").as_kwargs()).logits.float().logsumexp(-1).mean()
    loss.backward()  # flex has a backward on CUDA


# Document masking: two documents per row, the boundary inside a block (the hard case for block patterns).
DOCS = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])  # (B=2, L=12)


def _perturb_doc_a(x: torch.Tensor, pattern: str, positions: list[int], L: int = 12) -> torch.Tensor:
    """`x` (B, H, T, D) with row 0's token at each doc-A position changed (both halves under block_clean)."""
    x = x.clone()
    for i in positions:
        for j in ([i, L + i] if patterns.get(pattern).two_halves else [i]):
            x[0, :, j] += 1.0
    return x


@pytest.mark.parametrize("kind", ["dense", "flex"])
@pytest.mark.parametrize("pattern,block_size", CASES)
def test_document_a_changes_no_output_in_document_b_at_kernel_level(pattern, block_size, kind):
    torch.manual_seed(0)
    n = 24 if patterns.get(pattern).two_halves else 12
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    if kind == "dense":
        mask = dense_document_mask(P(pattern, block_size), 12, DOCS)
        attend = lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    else:
        block_mask = flex_document_mask(P(pattern, block_size), 12, DOCS)
        attend = lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)  # noqa: E731
    base = attend(q, k, v)
    changed = attend(*(_perturb_doc_a(x, pattern, [1, 4]) for x in (q, k, v)))
    diff = (base - changed).abs().amax(dim=(1, 3))[0]  # (T,) row 0
    doc_b = [i for i in range(n) if DOCS[0, i % 12] == 1]
    doc_a = [i for i in range(n) if DOCS[0, i % 12] == 0]
    assert diff[doc_b].max() == 0
    assert diff[doc_a].max() > 0


@pytest.mark.parametrize("pattern,block_size", CASES)
def test_flex_document_mask_equals_dense(pattern, block_size):
    dense = dense_document_mask(P(pattern, block_size), 12, DOCS)
    block_mask = flex_document_mask(P(pattern, block_size), 12, DOCS)
    n = dense.shape[-1]
    q = torch.zeros(2, 1, n, 8)
    out = flex_attention(q, torch.zeros(2, 1, n, 8), torch.eye(n).expand(2, 1, n, n), block_mask=block_mask)
    assert torch.equal(out > 0, dense)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_document_a_token_changes_no_model_output_in_document_b(backbone, pattern):
    L = 12
    ids = torch.randint(5, 300, (2, 2 * L if patterns.get(pattern).two_halves else L))
    changed = ids.clone()
    changed[0, 3] += 1  # document A (positions 0..4) of row 0
    if patterns.get(pattern).two_halves:
        changed[0, L + 3] += 1
    logits = [_doc_logits(backbone.model, x, pattern, 4) for x in (ids, changed)]
    diff = (logits[0] - logits[1]).abs().amax(-1)[0]
    assert diff[5:L].max() == 0 and diff[:5].max() > 0
    if patterns.get(pattern).two_halves:
        assert diff[L + 5:].max() == 0


def _doc_logits(model, ids, pattern, block_size, docs=DOCS):
    seq_len = ids.shape[1] // 2 if patterns.get(pattern).two_halves else ids.shape[1]
    attn = build_attention_inputs(P(pattern, block_size), batch_size=ids.shape[0], seq_len=seq_len,
                                  document_ids=docs)
    with torch.no_grad():
        return model(input_ids=ids, **attn.as_kwargs()).logits


@pytest.mark.parametrize("pattern", ["causal", "bidirectional"])
def test_packed_document_equals_the_document_alone(backbone, pattern):
    ids = torch.randint(5, 300, (2, 12))
    packed = _doc_logits(backbone.model, ids, pattern, 4)
    alone = _logits(backbone.model, ids[:1, 5:], pattern, 4)
    assert_close(packed[:1, 5:], alone, atol=1e-5, rtol=1e-5)


def test_document_positions_restart_per_document():
    assert document_positions(DOCS)[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    pos = position_ids(P("block_clean"), 2, 12, document_ids=DOCS)
    assert pos.shape == (2, 24) and pos[1, 12:].tolist() == document_positions(DOCS)[1].tolist()



# --- attention.clean_context: causal (joint AR + diffusion) ---------------------------------------------------


@pytest.mark.parametrize("block_size", [3, 4])
def test_causal_clean_context_flex_equals_dense_and_sdpa_kernel(block_size):
    torch.manual_seed(0)
    dense = dense_mask(P("block_clean", block_size, "causal"), 12)
    block_mask = flex_block_mask(P("block_clean", block_size, "causal"), 12, "cpu")
    assert torch.equal(_flex_dense_form(block_mask, dense.shape[0]), dense)
    q, k, v = (torch.randn(2, 4, 24, 16) for _ in range(3))
    expected = scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert_close(flex_attention(q, k, v, block_mask=block_mask), expected, atol=1e-5, rtol=1e-5)


def test_causal_clean_context_flex_document_mask_equals_dense():
    dense = dense_document_mask(P("block_clean", 4, "causal"), 12, DOCS)
    block_mask = flex_document_mask(P("block_clean", 4, "causal"), 12, DOCS)
    out = flex_attention(torch.zeros(2, 1, 24, 8), torch.zeros(2, 1, 24, 8), torch.eye(24).expand(2, 1, 24, 24),
                         block_mask=block_mask)
    assert torch.equal(out[:, 0] > 0, dense[:, 0])


def _clean_logits(model, ids, block_size):
    attn = build_attention_inputs(P("block_clean", block_size, "causal"), batch_size=1, seq_len=ids.shape[1] // 2,
                                  dtype=model.dtype)
    with torch.no_grad():
        return model(input_ids=ids, **attn.as_kwargs()).logits


def test_causal_clean_token_changes_only_later_clean_tokens_and_later_noisy_blocks(backbone):
    L, bs = 12, 4
    ids = torch.randint(5, 300, (1, 2 * L))
    changed = ids.clone()
    changed[0, L + 5] += 1  # clean token 5, inside block 1
    diff = (_clean_logits(backbone.model, ids, bs) - _clean_logits(backbone.model, changed, bs)).abs().amax(-1)[0]
    assert diff[L:L + 5].max() == 0 and diff[L + 5:].min() > 0  # token-causal inside the clean half
    assert diff[:8].max() == 0 and diff[8:L].min() > 0  # the noisy blocks after block 1 only


def test_causal_clean_half_equals_the_model_run_causally(backbone):
    L = 12
    ids = torch.randint(5, 300, (1, 2 * L))
    clean = _clean_logits(backbone.model, ids, 4)[:, L:]
    assert_close(clean, _logits(backbone.model, ids[:, L:], "causal", 4), atol=1e-5, rtol=1e-5)


def test_bad_clean_context_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"attention.clean_context='tokens': unknown clean context"):
        dense_mask(P("block_clean", 2, "tokens"), 4)
