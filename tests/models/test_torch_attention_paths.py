"""The torch attention paths (causal prefill, prefix-masked prefill, batched decode chunks)
against an independent float64 dense softmax over each unpaged sequence, windows included."""

import math

import pytest
import torch

from kvxfer.layers import torch_ops
from kvxfer.layers.attention import AttentionMetadata

BLOCK = 8


def reference(q, k, v, scale, window=None):
    """q [q_len, Hq, Dk], k [L, H, Dk], v [L, H, Dv]; queries at the last q_len positions, float64."""
    q_len, hq, _ = q.shape
    seq_len, h, _ = k.shape
    q, k, v = q.double(), k.double(), v.double()
    pos = torch.arange(seq_len)
    out = torch.empty(q_len, hq, v.shape[-1], dtype=torch.float64)
    for i in range(q_len):
        p = seq_len - q_len + i
        visible = (pos <= p) & ((pos > p - window) if window else True)
        for head in range(hq):
            kv = head // (hq // h)
            scores = (k[visible, kv] @ q[i, head]) * scale
            out[i, head] = torch.softmax(scores, 0) @ v[visible, kv]
    return out


def paged(seqs, heads, head_size, num_slots, dtype, gen):
    """A cache of scattered blocks holding every sequence's full K (and V), and the metadata."""
    blocks = [math.ceil(s / BLOCK) for s, _ in seqs]
    cache = torch.zeros(sum(blocks) + 3, heads, num_slots, BLOCK, head_size, dtype=dtype)
    free = torch.randperm(cache.shape[0], generator=gen).tolist()
    tables, dense = [], []
    for (seq_len, _), n in zip(seqs, blocks):
        table = [free.pop() for _ in range(n)]
        k = torch.randn(seq_len, heads, head_size, generator=gen).to(dtype)
        v = torch.randn(seq_len, heads, head_size, generator=gen).to(dtype) if num_slots == 2 else None
        slots = AttentionMetadata.build([seq_len], [seq_len], [table], BLOCK).slot_mapping
        torch_ops.store_kv(cache, k, v, slots)
        tables.append(table)
        dense.append((k, v))
    meta = AttentionMetadata.build([q for _, q in seqs], [s for s, _ in seqs], tables, BLOCK)
    return cache, meta, dense


# (context after the step, new tokens): whole prefills long enough for several flash-kernel
# tiles (causal path), chunked prefills over a cached prefix (masked path), decodes.
SEQS = [(150, 150), (37, 37), (2, 2), (90, 31), (64, 16), (70, 1), (5, 1), (129, 1), (33, 1)]


def check(seqs, hq, h, d, dtype, window, tol, v_dim=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache, meta, dense = paged(seqs, h, d, 1 if v_dim else 2, dtype, gen)
    query = torch.randn(meta.num_tokens, hq, d, generator=gen).to(dtype)
    scale = 1 / math.sqrt(d)
    out = torch_ops.paged_attention(query, cache, meta, scale, v_dim=v_dim, sliding_window=window)
    assert out.shape == (meta.num_tokens, hq, v_dim or d) and out.dtype == dtype
    for b, (seq_len, q_len) in enumerate(seqs):
        start = meta.query_start_loc_host[b]
        k, v = dense[b]
        ref = reference(query[start : start + q_len], k, k[..., :v_dim] if v_dim else v, scale, window)
        got = out[start : start + q_len].double()
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol, msg=f"sequence {b}")


@pytest.mark.parametrize("hq,h", [(8, 4), (8, 1), (6, 6), (16, 2)])
@pytest.mark.parametrize("window", [None, 1, 20, 64, 1000])
def test_paths_match_float64_reference(hq, h, window):
    check(SEQS, hq, h, 16, torch.float32, window, 1e-5, seed=hq + h)


@pytest.mark.parametrize("window", [None, 24])
def test_bfloat16_within_tolerance(window):
    # bf16 inputs, float32 accumulation inside SDPA: the error is the inputs' rounding, not the sum's.
    check(SEQS, 8, 4, 32, torch.bfloat16, window, 2e-2)


@pytest.mark.parametrize("window", [None, 40])
def test_mla_single_slot_v_is_a_prefix_of_the_latent(window):
    check(SEQS, 4, 1, 40, torch.float32, window, 1e-5, v_dim=32)


def test_decode_chunks_of_one_sequence_and_of_several(monkeypatch):
    # Chunk bound below one sequence's context (one sequence a chunk) and at a few sequences,
    # with decodes not contiguous in the batch (index path) and contiguous (slice path).
    seqs = [(40, 1), (9, 9), (17, 1), (3, 1), (60, 1), (25, 5), (8, 1), (31, 1)]
    for elements in (64, 4 * 64 * 2 * 2 * 16):
        monkeypatch.setattr(torch_ops, "_DECODE_CHUNK_ELEMENTS", elements)
        check(seqs, 4, 2, 16, torch.float32, None, 1e-5)
        check([(s, 1) for s, _ in seqs], 4, 2, 16, torch.float32, 12, 1e-5)


def test_decode_plans_are_built_once_per_step():
    gen = torch.Generator().manual_seed(1)
    cache, meta, _ = paged([(20, 1), (33, 1)], 2, 8, 2, torch.float32, gen)
    query = torch.randn(2, 4, 8, generator=gen)
    first = torch_ops.paged_attention(query, cache, meta, 0.3)
    plans = dict(meta.plan_cache)
    assert len(plans) == 1
    second = torch_ops.paged_attention(query, cache, meta, 0.3)  # the next layer of the same step
    assert meta.plan_cache == plans and all(meta.plan_cache[k] is plans[k] for k in plans)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("window", [None, 24])
def test_bfloat16_prefill_through_the_float32_kernel(monkeypatch, window):
    # Long bfloat16 prefills run SDPA on upcast inputs where bfloat16 matmuls are slow: lowered
    # threshold so the causal, masked and windowed paths of SEQS all take it here.
    monkeypatch.setattr(torch_ops, "_FLOAT32_PREFILL_MIN_TOKENS", 2)
    check(SEQS, 8, 4, 32, torch.bfloat16, window, 2e-2)
