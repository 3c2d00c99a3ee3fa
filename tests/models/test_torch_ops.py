"""torch attention ops against a dense softmax reference over the unpaged sequences."""

import math

import pytest
import torch

from kvxfer.layers import torch_ops
from kvxfer.layers.attention import AttentionMetadata

BLOCK = 4


def dense_reference(q, k, v, scale):
    """q [q_len, Hq, D], k/v [L, H, D]: causal attention with the queries at the last q_len positions."""
    q_len, hq, _ = q.shape
    seq_len, h, _ = k.shape
    group = hq // h
    out = torch.empty(q_len, hq, v.shape[-1], dtype=torch.float64)
    for i in range(q_len):
        visible = seq_len - q_len + i + 1
        for head in range(hq):
            kv = head // group
            scores = (k[:visible, kv].double() @ q[i, head].double()) * scale
            out[i, head] = torch.softmax(scores, 0) @ v[:visible, kv].double()
    return out


def fill_paged(seqs, heads, head_size, num_slots, total_blocks, gen):
    """Random full K/V per sequence written into randomly chosen cache blocks through store_kv."""
    cache = torch.zeros(total_blocks, heads, num_slots, BLOCK, head_size)
    free = torch.randperm(total_blocks, generator=gen).tolist()
    tables, dense = [], []
    for seq_len, _ in seqs:
        table = [free.pop() for _ in range(math.ceil(seq_len / BLOCK))]
        k = torch.randn(seq_len, heads, head_size, generator=gen)
        v = torch.randn(seq_len, heads, head_size, generator=gen) if num_slots == 2 else None
        meta = AttentionMetadata.build([seq_len], [seq_len], [table], BLOCK)
        torch_ops.store_kv(cache, k, v, meta.slot_mapping)
        tables.append(table)
        dense.append((k, v))
    return cache, tables, dense


# (context length after the step, new tokens): decode, prefill shorter than a block, exact
# multiple of the block, chunked / cached-prefix prefill, single-token prefill.
MIXED = [(9, 1), (3, 3), (8, 8), (13, 5), (1, 1), (20, 1), (16, 7)]


@pytest.mark.parametrize("hq,h", [(8, 4), (8, 2), (4, 4), (8, 1)])
def test_paged_attention_gqa_matches_dense(hq, h):
    gen = torch.Generator().manual_seed(hq * 10 + h)
    d = 16
    cache, tables, dense = fill_paged(MIXED, h, d, 2, 64, gen)
    meta = AttentionMetadata.build([q for _, q in MIXED], [s for s, _ in MIXED], tables, BLOCK)
    query = torch.randn(meta.num_tokens, hq, d, generator=gen)
    out = torch_ops.paged_attention(query, cache, meta, scale=0.3)
    assert out.shape == (meta.num_tokens, hq, d)
    for b, (seq_len, q_len) in enumerate(MIXED):
        start = meta.query_start_loc_host[b]
        k, v = dense[b]
        ref = dense_reference(query[start : start + q_len], k, v, 0.3)
        torch.testing.assert_close(out[start : start + q_len].double(), ref, atol=1e-5, rtol=1e-5)


def test_prefill_attends_to_the_new_kv_in_place_and_the_rest_to_the_cache():
    """`new_kv` (the step's K/V as stored) serves prefills with no cached prefix; sequences with a
    cached prefix and decodes still read the cache: with the cache wiped, only the former hold."""
    gen = torch.Generator().manual_seed(3)
    h, hq, d = 2, 4, 16
    cache, tables, dense = fill_paged(MIXED, h, d, 2, 64, gen)
    meta = AttentionMetadata.build([q for _, q in MIXED], [s for s, _ in MIXED], tables, BLOCK)
    query = torch.randn(meta.num_tokens, hq, d, generator=gen)
    new_k = torch.cat([k[s - q :] for (s, q), (k, _) in zip(MIXED, dense)])
    new_v = torch.cat([v[s - q :] for (s, q), (_, v) in zip(MIXED, dense)])
    torch.testing.assert_close(
        torch_ops.paged_attention(query, cache, meta, 0.3, new_kv=(new_k, new_v)),
        torch_ops.paged_attention(query, cache, meta, 0.3), atol=1e-6, rtol=1e-6)
    out = torch_ops.paged_attention(query, torch.zeros_like(cache), meta, 0.3, new_kv=(new_k, new_v))
    for b, (seq_len, q_len) in enumerate(MIXED):
        start = meta.query_start_loc_host[b]
        ref = dense_reference(query[start : start + q_len], *dense[b], 0.3)
        close = torch.allclose(out[start : start + q_len].double(), ref, atol=1e-5, rtol=1e-5)
        assert close == (q_len == seq_len > 1), (seq_len, q_len)


def test_paged_attention_mla_single_slot():
    gen = torch.Generator().manual_seed(7)
    latent, rope, hq = 24, 8, 4
    cache, tables, dense = fill_paged(MIXED, 1, latent + rope, 1, 64, gen)
    meta = AttentionMetadata.build([q for _, q in MIXED], [s for s, _ in MIXED], tables, BLOCK)
    query = torch.randn(meta.num_tokens, hq, latent + rope, generator=gen)
    out = torch_ops.paged_attention(query, cache, meta, scale=0.2, v_dim=latent)
    assert out.shape == (meta.num_tokens, hq, latent)
    for b, (seq_len, q_len) in enumerate(MIXED):
        start = meta.query_start_loc_host[b]
        k, _ = dense[b]
        ref = dense_reference(query[start : start + q_len], k, k[..., :latent], 0.2)
        torch.testing.assert_close(out[start : start + q_len].double(), ref, atol=1e-5, rtol=1e-5)


def test_store_kv_writes_only_its_slots_in_a_strided_layer_view():
    # Full rank cache [blocks, heads, layers, 2, block, D]; writing layer 1 leaves layer 0 untouched.
    cache = torch.zeros(6, 2, 3, 2, BLOCK, 8)
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    meta = AttentionMetadata.build([5], [7], [[4, 1]], BLOCK)  # positions 2..6
    torch_ops.store_kv(cache[:, :, 1], key, value, meta.slot_mapping)
    assert cache[:, :, 0].abs().sum() == 0 and cache[:, :, 2].abs().sum() == 0
    torch.testing.assert_close(cache[4, :, 1, 0, 2], key[0])
    torch.testing.assert_close(cache[4, :, 1, 1, 3], value[1])
    torch.testing.assert_close(cache[1, :, 1, 0, 2], key[4])
    assert cache[4, :, 1, :, :2].abs().sum() == 0


def test_store_kv_rejects_missing_value_for_two_slot_cache():
    cache = torch.zeros(2, 1, 2, BLOCK, 4)
    with pytest.raises(ValueError, match="needs a value tensor"):
        torch_ops.store_kv(cache, torch.randn(1, 1, 4), None, torch.tensor([0]))


def test_paged_attention_reads_a_strided_layer_view_of_the_whole_rank_cache():
    # The engine's cache is [blocks, heads, layers, 2, block, D]; attention gets `cache[:, :, i]`.
    # Other layers hold different values, so reading across a layer boundary would show up.
    gen = torch.Generator().manual_seed(3)
    h, hq, d, layers = 2, 4, 8, 3
    layer_cache, tables, dense = fill_paged(MIXED, h, d, 2, 40, gen)
    rank_cache = torch.randn(40, h, layers, 2, BLOCK, d, generator=gen)
    rank_cache[:, :, 1] = layer_cache
    meta = AttentionMetadata.build([q for _, q in MIXED], [s for s, _ in MIXED], tables, BLOCK)
    query = torch.randn(meta.num_tokens, hq, d, generator=gen)
    out = torch_ops.paged_attention(query, rank_cache[:, :, 1], meta, scale=0.5)
    for b, (seq_len, q_len) in enumerate(MIXED):
        start = meta.query_start_loc_host[b]
        k, v = dense[b]
        ref = dense_reference(query[start : start + q_len], k, v, 0.5)
        torch.testing.assert_close(out[start : start + q_len].double(), ref, atol=1e-5, rtol=1e-5)


def test_batched_decode_in_chunks_matches_dense(monkeypatch):
    # Many one-token sequences of different lengths, split into several gather chunks, with
    # their decode tokens interleaved among prefills in the flattened batch.
    monkeypatch.setattr(torch_ops, "_DECODE_CHUNK_ELEMENTS", 3 * 24 * 2 * 2 * 16)  # ~3 sequences a chunk
    gen = torch.Generator().manual_seed(5)
    seqs = [(int(n), 1) for n in torch.randint(1, 25, (10,), generator=gen)]
    seqs[3], seqs[7] = (12, 6), (5, 5)
    cache, tables, dense = fill_paged(seqs, 2, 16, 2, 96, gen)
    meta = AttentionMetadata.build([q for _, q in seqs], [s for s, _ in seqs], tables, BLOCK)
    query = torch.randn(meta.num_tokens, 4, 16, generator=gen)
    out = torch_ops.paged_attention(query, cache, meta, scale=0.25)
    for b, (seq_len, q_len) in enumerate(seqs):
        start = meta.query_start_loc_host[b]
        k, v = dense[b]
        ref = dense_reference(query[start : start + q_len], k, v, 0.25)
        torch.testing.assert_close(out[start : start + q_len].double(), ref, atol=1e-5, rtol=1e-5)
