"""KV head partitioning over TP ranks and the read plan between two TP sizes.

Owns the mapping math: which global KV heads each rank holds, which prefill
("remote") rank each decode ("local") rank reads each head from, and which prefill
ranks each decode rank notifies. Pure Python; a plan depends only on
(total heads, local TP, remote TP) and is computed once per triple.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class TPTransferSlice:
    """One read: `global_heads` from `remote_rank`, as head offsets in both tensors."""

    remote_rank: int
    global_heads: range
    local_heads: range
    remote_heads: range

    def __post_init__(self) -> None:
        if not len(self.global_heads) == len(self.local_heads) == len(self.remote_heads):
            raise ValueError(f"TPTransferSlice ranges differ in length: {self}")


def validate_tp(num_heads: int, tp_size: int) -> None:
    """Raise ValueError unless `tp_size` splits (H % tp == 0) or replicates (tp % H == 0) H heads."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"TP size must be a positive int, got tp={tp_size!r} (H={num_heads})")
    if num_heads % tp_size and tp_size % num_heads:
        raise ValueError(
            f"TP size tp={tp_size} does not fit H={num_heads} KV heads: need H % tp == 0 "
            f"(heads split over ranks) or tp % H == 0 (each head replicated on tp // H ranks)"
        )


def check_rank(rank: int, tp_size: int, what: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < tp_size:
        raise ValueError(f"{what}={rank!r} is out of range for TP size {tp_size}")


def heads_per_rank(num_heads: int, tp_size: int) -> int:
    validate_tp(num_heads, tp_size)
    return max(num_heads // tp_size, 1)


def head_range(num_heads: int, tp_rank: int, tp_size: int) -> range:
    n = heads_per_rank(num_heads, tp_size)
    check_rank(tp_rank, tp_size, "tp_rank")
    replicas = max(tp_size // num_heads, 1)
    start = (tp_rank // replicas) * n
    return range(start, start + n)


def _holders(num_heads: int, head: int, tp_size: int) -> range:
    """The ranks (in order) whose tensor holds global `head`."""
    replicas = max(tp_size // num_heads, 1)
    first = (head // max(num_heads // tp_size, 1)) * replicas
    return range(first, first + replicas)


@dataclass(frozen=True)
class TransferPlan:
    slices: tuple[tuple[TPTransferSlice, ...], ...]  # per local rank
    notify: tuple[tuple[int, ...], ...]  # per local rank, ascending
    consumers: tuple[tuple[int, ...], ...]  # per remote rank, ascending


@functools.lru_cache(maxsize=1024)
def transfer_plan(num_heads: int, local_tp: int, remote_tp: int) -> TransferPlan:
    """Plan every decode rank's reads and notifications for one pair of TP sizes.

    Per head: its n readers (decode ranks holding it) and m sources (prefill
    replicas). Reads go round-robin over the sources, starting at offset
    (head * n) % m, so each source serves floor or ceil of n / m reads. A source
    at round-robin position t is notified by the readers i with
    i % min(n, m) == t % min(n, m): exactly its readers when it is read, and one
    reader (t % n) when n < m leaves it unread.
    """
    validate_tp(num_heads, local_tp)
    validate_tp(num_heads, remote_tp)
    source = [dict[int, int]() for _ in range(local_tp)]  # local rank -> head -> remote rank
    notify = [set[int]() for _ in range(local_tp)]
    for head in range(num_heads):
        readers = _holders(num_heads, head, local_tp)
        sources = _holders(num_heads, head, remote_tp)
        n, m = len(readers), len(sources)
        offset = (head * n) % m
        for i, q in enumerate(readers):
            source[q][head] = sources[(offset + i) % m]
        k = min(n, m)
        for t in range(m):
            for i in range(t % k, n, k):
                notify[readers[i]].add(sources[(offset + t) % m])

    slices = []
    for q in range(local_tp):
        local = head_range(num_heads, q, local_tp)
        runs: list[list[int]] = []  # [remote rank, first head, end head]; consecutive heads merge
        for head in local:
            r = source[q][head]
            if runs and runs[-1][0] == r and runs[-1][2] == head:
                runs[-1][2] = head + 1
            else:
                runs.append([r, head, head + 1])
        slices.append(tuple(_slice(num_heads, local, remote_tp, *run) for run in runs))

    consumers = [[q for q in range(local_tp) if r in notify[q]] for r in range(remote_tp)]
    return TransferPlan(
        slices=tuple(slices),
        notify=tuple(tuple(sorted(s)) for s in notify),
        consumers=tuple(tuple(c) for c in consumers),
    )


def _slice(num_heads: int, local: range, remote_tp: int, rank: int, first: int, end: int) -> TPTransferSlice:
    remote_start = head_range(num_heads, rank, remote_tp).start
    return TPTransferSlice(
        remote_rank=rank,
        global_heads=range(first, end),
        local_heads=range(first - local.start, end - local.start),
        remote_heads=range(first - remote_start, end - remote_start),
    )
