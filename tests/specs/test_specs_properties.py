"""Property tests of head partitioning, TP transfer slices and notifications, for every TP pair."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

HEADS = [1, 2, 4, 8, 16, 32]
TPS = [1, 2, 4, 8, 16]
KINDS = ["full", "sliding", "mla"]


def make_spec(kind: str, num_heads: int):
    if kind == "full":
        return FullAttentionSpec(num_heads, 8, 3, 4, "float32")
    if kind == "sliding":
        return SlidingWindowSpec(num_heads, 8, 3, 4, "bfloat16", sliding_window=64)
    return MLAAttentionSpec(1, 12, 3, 4, "float16")


def is_valid(num_heads: int, tp: int) -> bool:
    return num_heads % tp == 0 or tp % num_heads == 0


def ref_head_range(num_heads: int, rank: int, tp: int) -> range:
    # Independent of the code: contiguous split when tp <= H, else head r*H//tp (tp//H replicas each).
    if tp <= num_heads:
        per = num_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank * num_heads // tp
    return range(head, head + 1)


def check_pair(spec, local_tp: int, remote_tp: int) -> None:
    H = spec.num_kv_heads
    if not (is_valid(H, local_tp) and is_valid(H, remote_tp)):
        bad = local_tp if not is_valid(H, local_tp) else remote_tp
        with pytest.raises(ValueError, match=rf"tp={bad}\b.*H={H}\b"):
            spec.get_tp_transfer_slices(0, local_tp, remote_tp)
        with pytest.raises(ValueError, match=rf"H={H}\b"):
            spec.consumers(0, local_tp, remote_tp)
        with pytest.raises(ValueError, match=rf"H={H}\b"):
            spec.notify_targets(0, local_tp, remote_tp)
        return

    for tp in (local_tp, remote_tp):
        for r in range(tp):
            assert spec.head_range(r, tp) == ref_head_range(H, r, tp)
            assert len(spec.head_range(r, tp)) == spec.heads_per_rank(tp)

    served = Counter()
    readers = {r: set() for r in range(remote_tp)}
    for q in range(local_tp):
        slices = spec.get_tp_transfer_slices(q, local_tp, remote_tp)
        mine = spec.head_range(q, local_tp)
        # Tiling: local_heads cover range(0, heads_per_rank) with no gap or overlap.
        covered = sorted(i for s in slices for i in s.local_heads)
        assert covered == list(range(spec.heads_per_rank(local_tp)))
        for s in slices:
            theirs = spec.head_range(s.remote_rank, remote_tp)
            assert 0 <= s.remote_rank < remote_tp
            assert len(s.global_heads) == len(s.local_heads) == len(s.remote_heads) > 0
            # Containment and agreement of global, local and remote numbering.
            assert s.remote_heads.start >= 0 and s.remote_heads.stop <= spec.heads_per_rank(remote_tp)
            assert [theirs[i] for i in s.remote_heads] == list(s.global_heads)
            assert [mine[i] for i in s.local_heads] == list(s.global_heads)
            served[s.remote_rank] += 1
            readers[s.remote_rank].add(q)
        # Read once, and merged: each needed head comes from exactly one slice, and no two
        # slices come from one prefill rank (its heads in our range are contiguous).
        assert sorted(h for s in slices for h in s.global_heads) == list(mine)
        assert len({s.remote_rank for s in slices}) == len(slices)
        if local_tp % remote_tp == 0:  # decode ranges nest inside prefill ranges: one read
            assert len(slices) == 1
        if local_tp == remote_tp:
            assert slices[0].remote_rank == q and slices[0].local_heads == range(spec.heads_per_rank(local_tp))
        if isinstance(spec, MLAAttentionSpec):
            assert len(slices) == 1 and slices[0].global_heads == range(0, 1)

    # Balance: prefill ranks holding the same heads serve slice counts within one of each other.
    groups = {}
    for r in range(remote_tp):
        groups.setdefault(spec.head_range(r, remote_tp), []).append(served[r])
    for counts in groups.values():
        assert max(counts) - min(counts) <= 1, groups

    # Notifications: readers notify what they read; the union covers every prefill rank; consumers
    # is the exact inverse of notify_targets.
    notified = {q: spec.notify_targets(q, local_tp, remote_tp) for q in range(local_tp)}
    for q, targets in notified.items():
        assert len(set(targets)) == len(targets)
        assert {s.remote_rank for s in spec.get_tp_transfer_slices(q, local_tp, remote_tp)} <= set(targets)
    assert set().union(*notified.values()) == set(range(remote_tp))
    for r in range(remote_tp):
        cons = spec.consumers(r, local_tp, remote_tp)
        assert sorted(cons) == sorted(q for q, t in notified.items() if r in t)
        assert readers[r] <= set(cons)
        assert len(cons) >= 1


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    num_heads=st.sampled_from(HEADS),
    local_tp=st.sampled_from(TPS),
    remote_tp=st.sampled_from(TPS),
)
def test_properties_hypothesis(kind, num_heads, local_tp, remote_tp):
    check_pair(make_spec(kind, num_heads), local_tp, remote_tp)


@pytest.mark.parametrize("kind", KINDS)
def test_every_pair_up_to_16(kind):
    # Exhaustive: every TP size 1..16 on both sides (valid pairs checked, invalid ones must raise),
    # including non-power-of-two head counts.
    pairs = 0
    for num_heads in sorted(set(HEADS + [3, 6, 12])):
        spec = make_spec(kind, num_heads)
        for local_tp in range(1, 17):
            for remote_tp in range(1, 17):
                check_pair(spec, local_tp, remote_tp)
                pairs += is_valid(spec.num_kv_heads, local_tp) and is_valid(spec.num_kv_heads, remote_tp)
    assert pairs > 0


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_range_ranks_raise(kind):
    spec = make_spec(kind, 8)
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match="local_tp_rank"):
            spec.get_tp_transfer_slices(bad, 4, 2)
        with pytest.raises(ValueError, match="local_tp_rank"):
            spec.notify_targets(bad, 4, 2)
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="remote_tp_rank"):
            spec.consumers(bad, 4, 2)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="tp_rank"):
            spec.head_range(bad, 4)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match="TP size"):
            spec.validate_tp(bad)


def test_invalid_tp_message_names_h_and_tp():
    spec = FullAttentionSpec(8, 8, 2, 4, "float32")
    with pytest.raises(ValueError, match=r"tp=3 .*H=8"):
        spec.validate_tp(3)
    with pytest.raises(ValueError, match=r"tp=12 .*H=8"):
        spec.heads_per_rank(12)
    spec.validate_tp(16)  # replication: 2 ranks per head
