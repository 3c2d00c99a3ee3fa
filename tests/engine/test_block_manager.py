"""Block manager: pure logic, no model."""

import pytest

from kvxfer.engine.block_manager import BlockManager, chain_hash
from kvxfer.engine.request import Request
from kvxfer.engine.sampling_params import SamplingParams

BS = 4


def make_request(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def run_prefill(bm, req):
    """Allocate the prompt (matching the prefix cache) and mark it computed."""
    ids, hashes = bm.match_prefix(req)
    assert bm.allocate(req, req.num_tokens, ids, hashes)
    req.num_computed_tokens = req.num_tokens
    bm.cache_computed_blocks(req)
    return len(ids)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, BS)
    req = make_request(range(10))
    assert bm.allocate(req, 10)
    assert len(req.block_ids) == 3 and bm.num_free_blocks == 5
    assert bm.allocate(req, 13)  # grows by one block
    assert len(req.block_ids) == 4
    bm.free(req)
    assert bm.num_free_blocks == 8 and req.block_ids == []


def test_allocation_fails_without_side_effects():
    bm = BlockManager(2, BS)
    req = make_request(range(9))
    assert not bm.allocate(req, 9)
    assert req.block_ids == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_counts():
    bm = BlockManager(16, BS)
    a = make_request(range(13), "a")
    assert run_prefill(bm, a) == 0
    b = make_request(list(range(12)) + [99, 100], "b")
    assert run_prefill(bm, b) == 3
    assert b.block_ids[:3] == a.block_ids[:3]
    assert bm.blocks[a.block_ids[0]].ref_count == 2
    assert bm.prefix_hit_blocks == 3 and bm.prefix_hit_tokens == 12
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_last_token_is_never_matched():
    bm = BlockManager(16, BS)
    run_prefill(bm, make_request(range(8), "a"))
    again = make_request(range(8), "b")
    ids, _ = bm.match_prefix(again)
    assert len(ids) == 1  # 8 tokens = 2 full blocks, but the last token must be computed


def test_freed_cached_blocks_are_revived_before_eviction():
    bm = BlockManager(4, BS)
    a = make_request(range(8), "a")
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # An unrelated 1-block request takes an uncached block first, keeping the cache.
    other = make_request([50, 51, 52], "o")
    assert bm.allocate(other, 3)
    assert bm.num_cached_blocks == 2
    b = make_request(list(range(8)) + [7], "b")
    assert run_prefill(bm, b) == 2
    assert b.block_ids[:2] == a_blocks_of(bm, range(8))


def a_blocks_of(bm, tokens):
    tokens = list(tokens)
    parent, ids = -1, []
    for i in range(len(tokens) // BS):
        parent = chain_hash(parent, tokens[i * BS : (i + 1) * BS])
        ids.append(bm._cached[parent])
    return ids


def test_eviction_when_pool_is_full_drops_stale_hashes():
    bm = BlockManager(2, BS)
    a = make_request(range(8), "a")
    run_prefill(bm, a)
    bm.free(a)
    b = make_request(range(100, 108), "b")
    run_prefill(bm, b)  # needs both blocks: evicts a's
    assert bm.num_cached_blocks == 2
    assert bm.match_prefix(make_request(list(range(8)) + [1], "c")) == ([], [])


def test_hash_collision_is_detected_by_token_comparison():
    bm = BlockManager(8, BS)
    a = make_request(range(5), "a")
    run_prefill(bm, a)
    # Forge a collision: point another prefix's hash at a's block.
    forged = chain_hash(-1, (9, 9, 9, 9))
    bm._cached[forged] = a.block_ids[0]
    ids, _ = bm.match_prefix(make_request([9, 9, 9, 9, 1], "b"))
    assert ids == []


def test_double_free_is_caught():
    bm = BlockManager(4, BS)
    req = make_request(range(3))
    bm.allocate(req, 3)
    tables = [list(t) for t in req.block_tables]
    bm.free(req)
    req.block_tables = tables
    with pytest.raises(AssertionError):
        bm.free(req)


def test_prefix_caching_disabled_matches_nothing():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    run_prefill(bm, make_request(range(9), "a"))
    assert bm.match_prefix(make_request(range(9), "b")) == ([], [])


def test_reset_prefix_cache_forgets_every_prefix():
    bm = BlockManager(8, BS)
    a = make_request(range(9), "a")
    run_prefill(bm, a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(make_request(range(9), "b")) == ([], [])
    bm.free(a)
    assert bm.num_free_blocks == 8


# --- KV cache groups: a full group and a sliding group of window 6 (blocks of 4) ---------------

W = 6


def hybrid_manager(full=16, sliding=8):
    return BlockManager((full, sliding), BS, windows=(None, W))


def window_entries(num_computed: int) -> range:
    """Entries the next position `p = num_computed` reads: positions p - W + 1 .. p."""
    return range(max(0, num_computed - W + 1) // BS, num_computed // BS + 1)


def test_sliding_group_gives_back_blocks_that_left_the_window():
    bm = hybrid_manager(sliding=9)  # 8 usable
    req = make_request(range(30))
    assert bm.allocate(req, 30)  # a prefill writes every position: all 8 entries real
    assert 0 not in req.block_tables[1] and bm.held_blocks(req, 1) == 8
    for n in range(30, 60):  # decode steps
        req.num_computed_tokens = n
        assert bm.allocate(req, n + 1)
        full, sliding = req.block_tables
        assert len(full) == len(sliding) == len(set(full)) == -(-(n + 1) // BS)
        real = [i for i, b in enumerate(sliding) if b != 0]
        assert real == list(window_entries(n)), (n, sliding)
    assert bm.num_free_blocks == (16 - 15) + (8 - 2)
    bm.free(req)
    assert bm.num_free_blocks == bm.num_blocks == 16 + 8  # the null block is nobody's


def test_sliding_pool_serves_more_sequences_than_it_holds_windows_of_tokens():
    bm = hybrid_manager(full=64, sliding=7)  # 6 usable sliding blocks: two windows
    reqs = [make_request(range(40), f"r{i}") for i in range(2)]
    for n in range(0, 40, 4):  # chunked prefills of 4 tokens, side by side
        for req in reqs:
            req.num_computed_tokens = n
            assert bm.allocate(req, n + 4), n
    assert all(bm.held_blocks(r, 1) <= 3 for r in reqs)


def test_remote_load_allocates_only_the_window_and_recompute_refills():
    bm = hybrid_manager(sliding=9)
    req = make_request(range(30))
    assert bm.allocate(req, 29, num_received=29)  # positions 0..28 arrive; 29 is computed here
    full, sliding = req.block_tables
    assert len(set(full)) == len(full) == 8
    assert [i for i, b in enumerate(sliding) if b != 0] == list(range(24 // BS, 8))
    # The load failed and is recomputed from position 0: every entry needs a real block again.
    assert bm.allocate(req, 30)
    assert 0 not in req.block_tables[1] and len(set(req.block_tables[1])) == 8


def test_a_short_sliding_pool_refuses_and_keeps_the_request_unchanged():
    bm = hybrid_manager(full=16, sliding=3)  # 2 usable sliding blocks
    req = make_request(range(12))
    assert not bm.allocate(req, 12)  # a 12-token prefill writes 3 blocks of the sliding group
    assert req.block_tables == [] and bm.num_free_blocks == 16 + 2
    assert bm.allocate(req, 8)
    assert bm.num_free_blocks == 14 + 0


def test_prefix_caching_is_off_with_a_sliding_group():
    bm = hybrid_manager()
    assert not bm.enable_prefix_caching
    a = make_request(range(13), "a")
    run_prefill(bm, a)
    assert bm.match_prefix(make_request(range(13), "b")) == ([], [])
