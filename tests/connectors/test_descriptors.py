"""Descriptor building against a byte-level simulation of the pools (pure logic, no NIXL)."""

import numpy as np
import pytest
from connector_actors import held_heads

from kvxfer.connectors.descriptors import Region, coalesce_runs, read_descriptors
from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec

LOCAL_BASE = 1 << 40
REMOTE_BASE = 1 << 30  # rank r's region starts at REMOTE_BASE * (r + 1)


def simulate(spec, p_tp: int, d_tp: int, d_rank: int, prefill_ids, decode_ids, pool: int, seed: int = 0):
    """Apply the descriptors to byte arrays; return (local pool, expected pool, descriptor count)."""
    rng = np.random.default_rng(seed)
    head = spec.bytes_per_head_block()
    content = rng.integers(0, 256, (spec.num_kv_heads, pool, head), dtype=np.uint8)  # [global head, block]
    remote_pools = {}
    for r in range(p_tp):
        heads = held_heads(spec.num_kv_heads, r, p_tp)
        remote_pools[r] = np.ascontiguousarray(content[heads].transpose(1, 0, 2)).reshape(-1)
    local_heads = held_heads(spec.num_kv_heads, d_rank, d_tp)
    local = np.zeros(pool * len(local_heads) * head, np.uint8)
    expected = np.zeros((pool, len(local_heads), head), np.uint8)
    for lid, rid in zip(decode_ids, prefill_ids):
        expected[lid] = content[local_heads, rid]

    local_region = Region(LOCAL_BASE, pool, spec.bytes_per_block(d_tp), head)
    remotes = {r: Region(REMOTE_BASE * (r + 1), pool, spec.bytes_per_block(p_tp), head) for r in range(p_tp)}
    slices = spec.get_tp_transfer_slices(d_rank, d_tp, p_tp)
    plan = read_descriptors(slices, local_region, remotes, decode_ids, prefill_ids)
    count = 0
    for r, (loc, rem) in plan.items():
        assert loc.shape == rem.shape and loc.shape[1] == 3 and (loc[:, 1] == rem[:, 1]).all()
        for (la, n, _), (ra, _, _) in zip(loc, rem):
            lo, ro = la - LOCAL_BASE, ra - REMOTE_BASE * (r + 1)
            assert 0 <= lo and lo + n <= local.size and 0 <= ro and ro + n <= remote_pools[r].size
            local[lo : lo + n] = remote_pools[r][ro : ro + n]
        count += len(loc)
    return local.reshape(pool, len(local_heads), head), expected, count


def gqa(heads: int, layers: int = 3) -> FullAttentionSpec:
    return FullAttentionSpec(num_kv_heads=heads, head_size=4, num_layers=layers, block_size=2, dtype="float32")


def mla(layers: int = 3) -> MLAAttentionSpec:
    return MLAAttentionSpec(num_kv_heads=1, head_size=12, num_layers=layers, block_size=2, dtype="float32")


CASES = [
    (gqa(4), p, d) for p, d in [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (1, 4), (4, 1)]
] + [
    (gqa(2), p, d) for p, d in [(1, 4), (4, 1), (4, 2), (2, 4), (4, 4), (8, 2)]
] + [
    (gqa(8), p, d) for p, d in [(2, 8), (8, 2), (4, 8), (8, 4)]
] + [
    (mla(), p, d) for p, d in [(1, 1), (1, 2), (2, 1), (4, 2), (1, 4), (4, 1)]
]


def case_id(value) -> str:
    return str(value) if isinstance(value, int) else type(value).__name__[:3] + str(value.num_kv_heads)


POOL = 24  # blocks per pool; 13 of them hold the prompt on each side


def scattered_block_ids(p_tp: int, d_tp: int) -> tuple[list[int], list[int]]:
    """13 prefill and 13 decode block ids, scattered over a pool of POOL, seeded by the TP pair."""
    rng = np.random.default_rng(p_tp * 10 + d_tp)
    return rng.permutation(POOL)[:13].tolist(), rng.permutation(POOL)[:13].tolist()


@pytest.mark.parametrize("spec,p_tp,d_tp", CASES, ids=case_id)
def test_descriptors_move_exactly_the_decode_ranks_bytes(spec, p_tp, d_tp):
    pool, (prefill_ids, decode_ids) = POOL, scattered_block_ids(p_tp, d_tp)
    for d_rank in range(d_tp):
        got, expected, _ = simulate(spec, p_tp, d_tp, d_rank, prefill_ids, decode_ids, pool)
        np.testing.assert_array_equal(got, expected)  # every other block stays zero too


def test_whole_block_slices_coalesce_runs_consecutive_on_both_sides():
    spec = gqa(4)
    prefill_ids = [3, 4, 5, 9, 10, 0]
    decode_ids = [7, 8, 2, 3, 4, 5]  # joint runs: [3,4]/[7,8], [5]/[2], [9,10]/[3,4], [0]/[5]
    got, expected, count = simulate(spec, 2, 2, 1, prefill_ids, decode_ids, pool=12)
    np.testing.assert_array_equal(got, expected)
    assert count == 4
    _, _, count = simulate(spec, 1, 1, 0, list(range(10)), list(range(2, 12)), pool=12)
    assert count == 1
    _, _, count = simulate(mla(), 4, 2, 1, list(range(10)), list(range(2, 12)), pool=12)
    assert count == 1  # the latent block is always whole


def test_partial_block_slices_take_one_descriptor_per_block_and_slice():
    ids = list(range(10))
    assert simulate(gqa(4), 2, 4, 0, ids, ids, pool=12)[2] == 10  # half of one remote rank's block
    assert simulate(gqa(4), 4, 2, 0, ids, ids, pool=12)[2] == 20  # two remote ranks, half a local block each
    assert simulate(gqa(2), 1, 4, 3, ids, ids, pool=12)[2] == 10  # one replicated head of two


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (2, 4), (4, 2), (4, 1)])
def test_descriptor_count_does_not_depend_on_layers(p_tp, d_tp):
    rng = np.random.default_rng(1)
    prefill_ids, decode_ids = rng.permutation(40)[:30].tolist(), rng.permutation(40)[:30].tolist()
    counts = {layers: simulate(gqa(4, layers), p_tp, d_tp, 0, prefill_ids, decode_ids, 40)[2] for layers in (1, 2, 7)}
    assert len(set(counts.values())) == 1, counts


def test_coalesce_runs():
    starts, lengths = coalesce_runs(np.array([1, 2, 3, 7, 8]), np.array([5, 6, 9, 10, 11]))
    assert starts.tolist() == [0, 2, 3] and lengths.tolist() == [2, 1, 2]
    starts, lengths = coalesce_runs(np.array([], np.int64), np.array([], np.int64))
    assert len(starts) == 0 and len(lengths) == 0


def test_mismatched_block_lists_are_rejected():
    spec = gqa(4)
    region = Region(0, 8, spec.bytes_per_block(1), spec.bytes_per_head_block())
    with pytest.raises(ValueError, match="2 local blocks for 3 remote"):
        read_descriptors(spec.get_tp_transfer_slices(0, 1, 1), region, {0: region}, [0, 1], [0, 1, 2])


def simulate_split(spec, p_tp: int, d_tp: int, d_rank: int, prefill_ids, decode_ids, pool: int, pad: int = 24):
    """`simulate` for regions split by layer (vLLM's layout: layer l's `[pool, heads, head]` at
    base + l * stride, `pad` bytes between layers); content is drawn per (layer, head, block)."""
    rng = np.random.default_rng(7)
    layers, head = spec.num_layers, spec.bytes_per_head_block() // spec.num_layers
    content = rng.integers(0, 256, (layers, spec.num_kv_heads, pool, head), dtype=np.uint8)

    def pool_of(heads) -> tuple[np.ndarray, int]:
        per_layer = pool * len(heads) * head
        buf = np.zeros(layers * (per_layer + pad), np.uint8)
        for layer in range(layers):
            at = layer * (per_layer + pad)
            buf[at : at + per_layer] = content[layer][heads].transpose(1, 0, 2).reshape(-1)
        return buf, per_layer + pad

    remote_pools = {r: pool_of(held_heads(spec.num_kv_heads, r, p_tp)) for r in range(p_tp)}
    local_heads = held_heads(spec.num_kv_heads, d_rank, d_tp)
    local_stride = pool * len(local_heads) * head + pad
    local = np.zeros(layers * local_stride, np.uint8)
    expected = np.zeros_like(local)
    for layer in range(layers):
        for lid, rid in zip(decode_ids, prefill_ids):
            at = layer * local_stride + lid * len(local_heads) * head
            expected[at : at + len(local_heads) * head] = content[layer][local_heads, rid].reshape(-1)
    local_region = Region(LOCAL_BASE, pool, len(local_heads) * head, head, 0, layers, local_stride)
    remotes = {r: Region(REMOTE_BASE * (r + 1), pool, spec.heads_per_rank(p_tp) * head, head, 0, layers, stride)
               for r, (_, stride) in remote_pools.items()}
    plan = read_descriptors(spec.get_tp_transfer_slices(d_rank, d_tp, p_tp), local_region, remotes, decode_ids,
                            prefill_ids)
    count = 0
    for r, (loc, rem) in plan.items():
        for (la, n, _), (ra, _, _) in zip(loc, rem):
            lo, ro = la - LOCAL_BASE, ra - REMOTE_BASE * (r + 1)
            assert 0 <= lo and lo + n <= local.size and 0 <= ro and ro + n <= remote_pools[r][0].size
            local[lo : lo + n] = remote_pools[r][0][ro : ro + n]
        count += len(loc)
    return local, expected, count


@pytest.mark.parametrize("spec,p_tp,d_tp", CASES, ids=case_id)
def test_layer_split_regions_move_exactly_the_decode_ranks_bytes(spec, p_tp, d_tp):
    pool, (prefill_ids, decode_ids) = POOL, scattered_block_ids(p_tp, d_tp)
    for d_rank in range(d_tp):
        got, expected, count = simulate_split(spec, p_tp, d_tp, d_rank, prefill_ids, decode_ids, pool)
        np.testing.assert_array_equal(got, expected)  # the padding between layers stays zero too
        # The same runs per layer as the block-major layout takes for all layers at once.
        assert count == spec.num_layers * simulate(spec, p_tp, d_tp, d_rank, prefill_ids, decode_ids, pool)[2]


def test_layer_split_whole_blocks_coalesce_within_each_layer():
    assert simulate_split(gqa(4), 1, 1, 0, list(range(10)), list(range(2, 12)), pool=12)[2] == 3  # 3 layers, 1 run
