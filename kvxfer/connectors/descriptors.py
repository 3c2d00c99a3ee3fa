"""TP transfer slices -> NIXL descriptor arrays.

A rank's KV tensor is `[num_blocks, heads, layers, kv, block_size, head_size]`, so one head
range of one block is one contiguous run over all layers: one descriptor per (block, slice),
however many layers the model has. When a slice is a whole block on both sides, runs of
blocks that are consecutive on both sides are adjacent bytes and become one descriptor. Each
KV cache group is its own tensor (region) with its own block ids; one READ per remote rank
carries every group's descriptors.

A region may also be split by layer (vLLM's per-layer views of one backing buffer:
`[layers][num_blocks, heads, kv, block_size, head_size]`, layer `l` at `base + l * layer_stride`):
then a head range of a block is one run per layer, and every descriptor above is repeated for
each layer, at the same offsets within that layer.
Pure numpy; arrays are `(N, 3)` int64 rows `(address, length, device_id)` as NIXL takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvxfer.specs import TPTransferSlice


@dataclass(frozen=True)
class Region:
    """One rank's registered KV tensor, as seen by the reader."""

    base_addr: int
    num_blocks: int
    block_bytes: int  # one block, all of the rank's heads and all layers (of one layer when split)
    head_bytes: int  # one head of one block, all layers (of one layer when split)
    device_id: int = 0
    num_layers: int = 1  # 1: the layers are inside each block; else the region is split by layer
    layer_stride: int = 0  # bytes from one layer's block 0 to the next's, when split


def coalesce_runs(local_ids: np.ndarray, remote_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices and lengths of maximal runs consecutive in both id sequences."""
    n = len(local_ids)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = (np.diff(local_ids) != 1) | (np.diff(remote_ids) != 1)
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))
    lengths = np.diff(np.concatenate((starts, [n])))
    return starts, lengths


def slice_descriptors(
    s: TPTransferSlice, local: Region, remote: Region, local_ids: np.ndarray, remote_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(local, remote) descriptor arrays reading slice `s` of every block pair."""
    length = len(s.local_heads) * local.head_bytes
    if length == local.block_bytes == remote.block_bytes:
        starts, runs = coalesce_runs(local_ids, remote_ids)
        local_addr = local.base_addr + local_ids[starts] * local.block_bytes
        remote_addr = remote.base_addr + remote_ids[starts] * remote.block_bytes
        lengths = runs * length
    else:
        local_addr = local.base_addr + local_ids * local.block_bytes + s.local_heads.start * local.head_bytes
        remote_addr = remote.base_addr + remote_ids * remote.block_bytes + s.remote_heads.start * remote.head_bytes
        lengths = np.full(len(local_ids), length, np.int64)
    if local.num_layers != remote.num_layers:
        raise ValueError(f"local region split in {local.num_layers} layers, remote in {remote.num_layers}")
    if local.num_layers > 1:  # the same runs in every layer, layer-major
        local_addr = (local_addr[None, :] + local.layer_stride * np.arange(local.num_layers)[:, None]).ravel()
        remote_addr = (remote_addr[None, :] + remote.layer_stride * np.arange(remote.num_layers)[:, None]).ravel()
        lengths = np.tile(lengths, local.num_layers)
    return _rows(local_addr, lengths, local.device_id), _rows(remote_addr, lengths, remote.device_id)


def read_descriptors(
    slices: list[TPTransferSlice],
    local: Region,
    remotes: dict[int, Region],
    local_ids: list[int],
    remote_ids: list[int],
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per remote rank, the (local, remote) descriptors of all of its slices."""
    if len(local_ids) != len(remote_ids):
        raise ValueError(f"{len(local_ids)} local blocks for {len(remote_ids)} remote blocks")
    lids, rids = np.asarray(local_ids, np.int64), np.asarray(remote_ids, np.int64)
    per_rank: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for s in slices:
        per_rank.setdefault(s.remote_rank, []).append(slice_descriptors(s, local, remotes[s.remote_rank], lids, rids))
    return {
        rank: (np.concatenate([d[0] for d in parts]), np.concatenate([d[1] for d in parts]))
        for rank, parts in per_rank.items()
    }


def group_read_descriptors(
    slices: list[TPTransferSlice],
    local: list[Region],
    remotes: dict[int, list[Region]],
    local_ids: list[list[int]],
    remote_ids: list[list[int]],
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """`read_descriptors` for every KV cache group `g` (regions `local[g]`, `remotes[rank][g]`,
    blocks `local_ids[g]`, `remote_ids[g]`), concatenated per remote rank."""
    per_rank: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for g, (lids, rids) in enumerate(zip(local_ids, remote_ids)):
        if not lids:
            continue
        group_remotes = {rank: regions[g] for rank, regions in remotes.items()}
        for rank, descs in read_descriptors(slices, local[g], group_remotes, lids, rids).items():
            per_rank.setdefault(rank, []).append(descs)
    return {
        rank: (np.concatenate([d[0] for d in parts]), np.concatenate([d[1] for d in parts]))
        for rank, parts in per_rank.items()
    }


def _rows(addr: np.ndarray, lengths: np.ndarray, device_id: int) -> np.ndarray:
    out = np.empty((len(addr), 3), np.int64)
    out[:, 0], out[:, 1], out[:, 2] = addr, lengths, device_id
    return out
