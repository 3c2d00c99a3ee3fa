"""Paged KV block pools, one per KV cache group: ref-counted blocks, window sliding for
sliding-window groups, and a prefix cache keyed by chained block hashes.

A request holds one block table per group (`Request.block_tables`), all indexed alike: entry `i`
holds positions `i * block_size ..` of that group's layers. A sliding-window group's entries
that have fallen out of the window are returned to its pool and replaced by the group's null
block (id 0, reserved, never written): the window mask never reads it, so the table keeps its
shape while the group holds about one window of blocks per request.

Prefix caching covers models whose only group is full attention (or MLA); with sliding groups
it is turned off (a cached prefix would also need each sliding group's last window).

A full block's hash chains its parent's hash with its own tokens, so equal hashes mean
equal prefixes; the tokens and the parent hash are compared too, so a hash collision
can never hand out another prefix's KV. Freed blocks keep their hash and stay findable
until they are handed out again; uncached free blocks are handed out first, then cached
ones in least-recently-freed order.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvxfer.engine.request import Request
from kvxfer.specs import KVCacheGroup, SlidingWindowSpec

if TYPE_CHECKING:
    from kvxfer.engine.config import EngineConfig
    from kvxfer.models.config import ModelConfig

_ROOT_HASH = -1
NULL_BLOCK = 0  # a sliding group's reserved block standing for blocks out of the window

logger = logging.getLogger(__name__)


def engine_kv_cache_groups(model_config: ModelConfig, config: EngineConfig) -> tuple[KVCacheGroup, ...]:
    """The groups an engine caches the model in (the scheduler and every rank alike)."""
    return model_config.kv_cache_groups(config.block_size, config.torch_dtype_name)


def group_windows(groups: Sequence[KVCacheGroup]) -> tuple[int | None, ...]:
    """Each group's sliding window, None for full attention (what `BlockManager` takes)."""
    return tuple(g.spec.sliding_window if isinstance(g.spec, SlidingWindowSpec) else None for g in groups)


def chain_hash(parent_hash: int, token_ids: Sequence[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.parent_hash = _ROOT_HASH
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    """Pools of `num_blocks[g]` blocks for groups whose sliding windows are `windows[g]` (None:
    full attention); one int and no windows is one full-attention pool."""

    def __init__(
        self,
        num_blocks: int | Sequence[int],
        block_size: int,
        enable_prefix_caching: bool = True,
        windows: Sequence[int | None] = (None,),
    ) -> None:
        counts = (num_blocks,) if isinstance(num_blocks, int) else tuple(num_blocks)
        if len(counts) != len(windows):
            raise ValueError(f"BlockManager: {len(counts)} pool sizes for {len(windows)} groups")
        for count, window in zip(counts, windows):
            if count < 1 + (window is not None):  # a sliding pool also holds its null block
                raise ValueError(f"BlockManager: a pool of {count} blocks is too small (window {window})")
        self.block_size = block_size
        self.windows = tuple(windows)
        if enable_prefix_caching and any(w is not None for w in self.windows):
            logger.info("prefix caching is off: this model has sliding-window layers")
            enable_prefix_caching = False
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [[Block(i) for i in range(n)] for n in counts]
        self.blocks = self.pools[0]  # the prefix cache's pool (the only group when it is on)
        self._free: list[OrderedDict[int, None]] = [
            OrderedDict((i, None) for i in range(w is not None, n)) for n, w in zip(counts, self.windows)
        ]
        self._cached: dict[int, int] = {}  # hash -> block id
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefix_hit_blocks = 0

    @property
    def num_blocks(self) -> int:
        """Blocks requests can hold, over all groups (null blocks excluded)."""
        return sum(len(p) - (w is not None) for p, w in zip(self.pools, self.windows))

    @property
    def num_free_blocks(self) -> int:
        return sum(len(f) for f in self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        """Entries of every group's table for `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def held_blocks(self, request: Request, group: int) -> int:
        """Blocks of the group's pool the request holds (its null entries excluded)."""
        table = request.block_tables[group] if request.block_tables else []
        return len(table) if self.windows[group] is None else sum(b != NULL_BLOCK for b in table)

    def match_prefix(self, request: Request) -> tuple[list[int], list[int]]:
        """Cached blocks holding a prefix of the request's tokens, and their hashes.

        The last token is never matched: its logits must be computed to sample from it.
        """
        if not self.enable_prefix_caching:
            return [], []
        tokens = request.all_token_ids
        ids: list[int] = []
        hashes: list[int] = []
        parent = _ROOT_HASH
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, chunk)
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != chunk or block.parent_hash != parent:
                break  # hash collision: a different prefix
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def _window_start(self, group: int, request: Request, num_received: int) -> int:
        """First table entry a sliding group needs: the window of the next position computed
        (`num_computed_tokens`, or `num_received` when positions below it arrive remotely)."""
        first = max(request.num_computed_tokens, num_received) - self.windows[group] + 1
        return max(0, first) // self.block_size

    def _new_blocks(self, group: int, table: list[int], start: int, need: int) -> int:
        """Blocks a sliding group takes to make entries `start .. need - 1` real: the null
        entries there (a prefix of the table's nulls, left by a failed remote load that is now
        recomputed) and the appended ones."""
        i = start
        while i < min(len(table), need) and table[i] == NULL_BLOCK:
            i += 1
        return i - start + max(0, need - max(len(table), start))

    def can_allocate(
        self, request: Request, num_tokens: int, cached_ids: Sequence[int] = (), num_received: int = 0
    ) -> bool:
        revived = sum(1 for b in cached_ids if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(num_tokens)
        for g, free in enumerate(self._free):
            table = request.block_tables[g] if request.block_tables else []
            if self.windows[g] is None:
                new = max(need - len(table) - (len(cached_ids) if g == 0 else 0), 0) + (revived if g == 0 else 0)
            else:
                new = self._new_blocks(g, table, self._window_start(g, request, num_received), need)
            if new > len(free):
                return False
        return True

    def allocate(
        self,
        request: Request,
        num_tokens: int,
        cached_ids: Sequence[int] = (),
        cached_hashes: Sequence[int] = (),
        num_received: int = 0,
    ) -> bool:
        """Give the request blocks for its first `num_tokens` tokens, starting with the matched
        prefix blocks; positions below `num_received` arrive from a remote engine, so sliding
        groups get blocks only for the window of position `num_received` (null entries before).

        Sliding groups first give back the blocks before the window of the request's next
        position: never needed again, so this holds whatever the answer. Returns False,
        changing nothing else, when a pool is short."""
        self._slide_windows(request, num_received)
        if not self.can_allocate(request, num_tokens, cached_ids, num_received):
            return False
        if not request.block_tables:
            request.block_tables = [[] for _ in self.pools]
        if cached_ids:
            assert not request.block_ids, "prefix blocks are only attached to a request without blocks"
            for block_id in cached_ids:
                self._touch(block_id)
            request.block_tables[0].extend(cached_ids)
            request.block_hashes = list(cached_hashes)
            self.prefix_hit_blocks += len(cached_ids)
        if request.num_computed_tokens == 0:
            self.prefix_query_tokens += request.num_prompt_tokens
            self.prefix_hit_tokens += len(cached_ids) * self.block_size
        need = self.blocks_needed(num_tokens)
        for g, table in enumerate(request.block_tables):
            start = 0
            if self.windows[g] is not None:
                start = i = self._window_start(g, request, num_received)
                while i < min(len(table), need) and table[i] == NULL_BLOCK:  # see _new_blocks
                    table[i] = self._take_free(g)
                    i += 1
            while len(table) < need:
                table.append(NULL_BLOCK if len(table) < start else self._take_free(g))
        return True

    def _slide_windows(self, request: Request, num_received: int) -> None:
        """Replace the sliding groups' entries below the window with the null block. Entries
        before an out-of-window one are already null: walk back from the window's start."""
        if not request.block_tables:
            return
        for g, window in enumerate(self.windows):
            if window is None:
                continue
            table = request.block_tables[g]
            i = min(self._window_start(g, request, num_received), len(table)) - 1
            while i >= 0 and table[i] != NULL_BLOCK:
                self._release(g, table[i])
                table[i] = NULL_BLOCK
                i -= 1

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        tokens = None
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        for i in range(len(request.block_hashes), num_full):
            if tokens is None:
                tokens = request.all_token_ids
            parent = request.block_hashes[-1] if request.block_hashes else _ROOT_HASH
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, chunk)
            request.block_hashes.append(h)
            block = self.blocks[request.block_ids[i]]
            if h in self._cached or block.hash is not None:
                continue  # the same prefix is already cached in another block
            block.hash, block.parent_hash, block.token_ids = h, parent, chunk
            self._cached[h] = block.block_id

    def free(self, request: Request) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        for g, table in enumerate(request.block_tables):
            for block_id in reversed(table):
                if self.windows[g] is None or block_id != NULL_BLOCK:
                    self._release(g, block_id)
        request.block_tables = []
        request.block_hashes = []

    def alone_in_pools(self, request: Request) -> bool:
        """Whether every block of every pool is free or held by `request`."""
        return all(
            len(free) + self.held_blocks(request, g) >= len(pool) - (w is not None)
            for g, (free, pool, w) in enumerate(zip(self._free, self.pools, self.windows))
        )

    def _release(self, group: int, block_id: int) -> None:
        block = self.pools[group][block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} of group {group} freed twice"
        if block.ref_count == 0:
            self._free[group][block_id] = None
            if block.hash is None:
                self._free[group].move_to_end(block_id, last=False)

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[0][block_id]
        block.ref_count += 1

    def _take_free(self, group: int) -> int:
        block_id, _ = self._free[group].popitem(last=False)
        block = self.pools[group][block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash, block.parent_hash, block.token_ids = None, _ROOT_HASH, ()
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay allocated, just unshared from now on)."""
        for block_id in self._cached.values():
            block = self.blocks[block_id]
            block.hash, block.parent_hash, block.token_ids = None, _ROOT_HASH, ()
        self._cached.clear()
