"""KV cache groups: layer grouping, blocks a sliding group must hold or read (checked by brute
force over token positions), and the split of a rank's memory between group pools."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.specs import (
    FullAttentionSpec,
    KVCacheGroup,
    SlidingWindowSpec,
    group_layers,
    num_blocks_for,
    split_num_blocks,
)

windows_st = st.lists(st.sampled_from([None, 1, 5, 16, 33, 4096]), min_size=1, max_size=12)


def make_spec(window, block_size, num_layers=2):
    if window is None:
        return FullAttentionSpec(4, 8, num_layers, block_size, "bfloat16")
    return SlidingWindowSpec(4, 8, num_layers, block_size, "bfloat16", sliding_window=window)


def visible_blocks(first_pos: int, end_pos: int, block_size: int) -> set[int]:
    """Blocks holding positions first_pos .. end_pos - 1, position by position."""
    return {p // block_size for p in range(first_pos, end_pos)}


@settings(max_examples=200, deadline=None)
@given(windows=windows_st, block_size=st.sampled_from([1, 4, 16]))
def test_groups_partition_the_layers_by_window(windows, block_size):
    groups = group_layers(tuple(windows), 4, 8, block_size, "bfloat16")
    assert sorted(layer for g in groups for layer in g.layer_ids) == list(range(len(windows)))
    for g in groups:
        kinds = {windows[layer] for layer in g.layer_ids}
        assert len(kinds) == 1
        window = kinds.pop()
        assert getattr(g.spec, "sliding_window", None) == window
        assert isinstance(g.spec, FullAttentionSpec if window is None else SlidingWindowSpec)
    assert len(groups) == len(set(windows))
    assert (None in windows) == isinstance(groups[0].spec, FullAttentionSpec)
    # A group's block holds its layers only: the groups' blocks add up to the whole model's.
    whole = FullAttentionSpec(4, 8, len(windows), block_size, "bfloat16")
    for tp in (1, 2, 8):
        assert sum(g.spec.bytes_per_block(tp) for g in groups) == whole.bytes_per_block(tp)


@settings(max_examples=300, deadline=None)
@given(window=st.sampled_from([None, 1, 2, 7, 16, 17, 40]), block_size=st.sampled_from([1, 4, 16]),
       n=st.integers(0, 200))
def test_blocks_needed_and_read_match_visible_positions(window, block_size, n):
    spec = make_spec(window, block_size)
    w = window or 10**9
    # The newest of n tokens (position n - 1) sees max(0, n - w) .. n - 1; the blocks from the
    # first visible one to the last one are held (blocks before it can be freed).
    held = visible_blocks(max(0, n - w), n, block_size)
    assert spec.blocks_needed(n) == len(held)
    # With n tokens received, the decode side computes position n: it reads the received
    # positions it sees, max(0, n - w + 1) .. n - 1, and nothing else.
    read = spec.blocks_to_read(n)
    assert set(read) == visible_blocks(max(0, n - w + 1), n, block_size)
    assert read.step == 1 and (not read or read.stop == -(-n // block_size))


@settings(max_examples=200, deadline=None)
@given(window=st.sampled_from([None, 1, 2, 7, 16, 17, 40]), block_size=st.sampled_from([1, 4, 16]),
       max_tokens=st.integers(1, 150))
def test_max_blocks_needed_bounds_every_length_and_is_reached(window, block_size, max_tokens):
    spec = make_spec(window, block_size)
    most = max(spec.blocks_needed(n) for n in range(max_tokens + 1))
    assert spec.max_blocks_needed(max_tokens) >= most
    if window is None or max_tokens >= window + block_size - 1:  # long enough to hit every alignment
        assert spec.max_blocks_needed(max_tokens) == most


@settings(max_examples=300, deadline=None)
@given(windows=windows_st, block_size=st.sampled_from([1, 4, 16]), tp=st.sampled_from([1, 2, 4]),
       available=st.integers(0, 1 << 30), max_tokens=st.integers(1, 1 << 17))
def test_split_fits_and_gives_every_group_the_same_request_capacity(windows, block_size, tp, available, max_tokens):
    groups = group_layers(tuple(windows), 4, 8, block_size, "bfloat16")
    blocks = split_num_blocks(groups, available, tp, max_tokens)
    sizes = [g.spec.bytes_per_block(tp) for g in groups]
    needs = [g.spec.max_blocks_needed(max_tokens) for g in groups]
    assert sum(b * s for b, s in zip(blocks, sizes)) <= available
    # Whole requests of max_tokens that all pools can hold at once, and no pool short of it.
    requests = available // sum(n * s for n, s in zip(needs, sizes))
    assert all(b >= requests * n for b, n in zip(blocks, needs))
    # Proportional to need: pools differ in request capacity by less than one request.
    capacity = [b / n for b, n in zip(blocks, needs)]
    assert max(capacity) - min(capacity) < 1
    if len(groups) == 1 and isinstance(groups[0].spec, FullAttentionSpec):
        assert blocks == (num_blocks_for(groups[0].spec, available, tp),)
    more = split_num_blocks(groups, available + (1 << 20), tp, max_tokens)
    assert all(m >= b for m, b in zip(more, blocks))


def test_sliding_groups_get_most_requests_for_long_contexts():
    # Gemma-3-like 5 local (window 1024) : 1 global, 32k-token requests, block 16: a local layer
    # holds 65 blocks per request, a global one 2048.
    windows = tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(12))
    full, local = group_layers(windows, 4, 8, 16, "bfloat16")
    assert (full.spec.num_layers, local.spec.num_layers) == (2, 10)
    assert (full.spec.max_blocks_needed(32768), local.spec.max_blocks_needed(32768)) == (2048, 65)
    blocks = split_num_blocks((full, local), 1 << 30, 1, 32768)
    assert blocks[0] // 2048 == blocks[1] // 65


def test_bad_inputs_name_the_field():
    groups = group_layers((None, 8), 4, 8, 4, "float32")
    with pytest.raises(ValueError, match="available_bytes"):
        split_num_blocks(groups, -1, 1, 10)
    with pytest.raises(ValueError, match="max_tokens"):
        split_num_blocks(groups, 100, 1, 0)
    with pytest.raises(ValueError, match="at least one"):
        group_layers((), 4, 8, 4, "float32")
    with pytest.raises(ValueError, match="num_tokens"):
        groups[1].spec.blocks_needed(-1)
    with pytest.raises(ValueError, match="num_received_tokens"):
        groups[1].spec.blocks_to_read(1.5)
    with pytest.raises(ValueError, match="num_layers is 2 for 1 layers"):
        KVCacheGroup((0,), FullAttentionSpec(4, 8, 2, 4, "float32"))
    with pytest.raises(ValueError, match="ascending"):
        KVCacheGroup((1, 0), FullAttentionSpec(4, 8, 2, 4, "float32"))
    with pytest.raises(ValueError, match="sliding_window"):
        group_layers((0,), 4, 8, 4, "float32")
