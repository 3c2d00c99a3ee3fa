"""KV cache groups of a hybrid model: layers grouped by attention kind, and how one rank's KV
memory is split between the groups' block pools.

A group is the layers that share an attention kind (all full-attention layers; the sliding
layers of one window size), with a spec whose `num_layers` is the group's layer count, so a
group's block still covers all of its layers in one contiguous run per head. The engine keeps
one cache tensor and one block table per request for each group (`ModelConfig.kv_cache_groups`;
see "KV cache groups" in docs/architecture.md). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvxfer.specs.kv_cache_spec import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec


@dataclass(frozen=True)
class KVCacheGroup:
    """Model layers `layer_ids` (ascending) cached together under `spec`."""

    layer_ids: tuple[int, ...]
    spec: KVCacheSpec

    def __post_init__(self) -> None:
        if not self.layer_ids or list(self.layer_ids) != sorted(set(self.layer_ids)):
            raise ValueError(f"KVCacheGroup.layer_ids must be distinct ascending layers, got {self.layer_ids!r}")
        if self.spec.num_layers != len(self.layer_ids):
            raise ValueError(
                f"KVCacheGroup.spec.num_layers is {self.spec.num_layers} for {len(self.layer_ids)} layers"
            )


def group_layers(
    sliding_windows: tuple[int | None, ...], num_kv_heads: int, head_size: int, block_size: int, dtype: str
) -> tuple[KVCacheGroup, ...]:
    """Groups from each layer's window (None: full attention): the full layers first, then one
    group per window size, smallest first."""
    if not sliding_windows:
        raise ValueError("group_layers needs at least one layer")
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(sliding_windows):
        by_window.setdefault(window, []).append(layer)
    groups = []
    for window in sorted(by_window, key=lambda w: (w is not None, w or 0)):
        layers = tuple(by_window[window])
        common = dict(num_kv_heads=num_kv_heads, head_size=head_size, num_layers=len(layers),
                      block_size=block_size, dtype=dtype)
        spec = FullAttentionSpec(**common) if window is None else SlidingWindowSpec(**common, sliding_window=window)
        groups.append(KVCacheGroup(layers, spec))
    return tuple(groups)


def split_num_blocks(
    groups: tuple[KVCacheGroup, ...], available_bytes: int, tp_size: int, max_tokens: int
) -> tuple[int, ...]:
    """Blocks of each group's pool that fit together in `available_bytes` of one rank.

    Why this split: a request of up to `max_tokens` tokens holds at most
    `spec.max_blocks_needed(max_tokens)` blocks of each group at once (all of its blocks for
    full attention; about one window's worth for a sliding group, whose older blocks are freed).
    Giving every group blocks in proportion to that need lets each pool hold the same number of
    such requests, so no group runs out while another still has room; any other split leaves
    memory in some group that no additional request could use. A full-attention-only model gets
    `available_bytes // bytes_per_block`, as `num_blocks_for` gives. Every rank computes this
    from its own memory; the engine then takes the MIN over ranks per group, which keeps the
    result fitting on every rank.
    """
    if not isinstance(available_bytes, int) or isinstance(available_bytes, bool) or available_bytes < 0:
        raise ValueError(f"available_bytes must be a non-negative int, got {available_bytes!r}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if not groups:
        raise ValueError("split_num_blocks needs at least one group")
    needs = [g.spec.max_blocks_needed(max_tokens) for g in groups]
    request_bytes = sum(n * g.spec.bytes_per_block(tp_size) for n, g in zip(needs, groups))
    return tuple(available_bytes * n // request_bytes for n in needs)
