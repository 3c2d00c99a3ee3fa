"""Paged KV block pools, one per KV cache group: ref-counted blocks, window sliding for
sliding-window groups, and a prefix cache keyed by chained block hashes.

A request holds one block table per group (`Request.block_tables`), all indexed alike: entry `i`
holds positions `i * block_size ..` of that group's layers. A sliding-window group's entries
that have fallen out of the window are returned to its pool and replaced by the group's null
block (id 0, reserved, never written): the window mask never reads it, so the table keeps its
shape while the group holds about one window of blocks per request.

Prefix caching covers every group: entry `i` of every group's table holds the same tokens, so
one chain of block hashes names them all and each pool caches its computed blocks under them
(sliding blocks too, before they slide out: freed, they stay findable until handed out again).
A cached prefix of `L` blocks is reusable only when every group has what the next position
needs: a full-attention group its `L` blocks, a sliding group the blocks from the start of that
position's window to `L` (null entries before it); the longest such `L` is the hit.

A full block's hash chains its parent's hash with its own tokens, so equal hashes mean
equal prefixes; the tokens and the parent hash are compared too, so a hash collision
can never hand out another prefix's KV. Freed blocks keep their hash and stay findable
until they are handed out again; uncached free blocks are handed out first, then cached
ones in least-recently-freed order.
"""

from __future__ import annotations

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
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [[Block(i) for i in range(n)] for n in counts]
        self.blocks = self.pools[0]  # the first group's pool (the only one without sliding layers)
        self._free: list[OrderedDict[int, None]] = [
            OrderedDict((i, None) for i in range(w is not None, n)) for n, w in zip(counts, self.windows)
        ]
        self._cached: list[dict[int, int]] = [{} for _ in counts]  # per group: hash -> block id
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
        return sum(len(c) for c in self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        """Entries of every group's table for `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def held_blocks(self, request: Request, group: int) -> int:
        """Blocks of the group's pool the request holds (its null entries excluded)."""
        return len(self._real(group, request.block_tables[group] if request.block_tables else []))

    def _real(self, group: int, ids: Sequence[int]) -> list[int]:
        """The pool blocks among a group's table entries: all of a full group's (block 0 is one
        of them), a sliding group's but its null entries."""
        return list(ids) if self.windows[group] is None else [b for b in ids if b != NULL_BLOCK]

    def match_prefix(self, request: Request) -> tuple[list[list[int]], list[int]]:
        """Per group, the cached blocks of the longest prefix every group can reuse (a sliding
        group's entries before the window of the first position computed are the null block),
        and the prefix's block hashes; `([], [])` for no hit.

        The last token is never matched: its logits must be computed to sample from it.
        """
        if not self.enable_prefix_caching:
            return [], []
        tokens = request.all_token_ids
        hashes: list[int] = []
        hits: list[list[int | None]] = [[] for _ in self.pools]  # per group, per block: cached id
        parent = _ROOT_HASH
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, chunk)
            for g, pool in enumerate(self.pools):
                block_id = self._cached[g].get(h)
                if block_id is not None and (pool[block_id].token_ids != chunk or pool[block_id].parent_hash != parent):
                    block_id = None  # hash collision: a different prefix
                hits[g].append(block_id)
            # Past a full group's first miss no longer prefix can be reused.
            if any(w is None and hits[g][-1] is None for g, w in enumerate(self.windows)):
                hits = [ids[:-1] for ids in hits]
                break
            hashes.append(h)
            parent = h
        for n in range(len(hashes), 0, -1):
            starts = [0 if w is None else self._first_in_window(w, n * self.block_size) for w in self.windows]
            if all(None not in ids[start:n] for ids, start in zip(hits, starts)):
                return [[NULL_BLOCK] * start + ids[start:n] for ids, start in zip(hits, starts)], hashes[:n]
        return [], []

    def _first_in_window(self, window: int, position: int) -> int:
        """First table entry position `position`'s window (`(position - W, position]`) reads."""
        return max(0, position - window + 1) // self.block_size

    def _window_start(self, group: int, request: Request, num_received: int) -> int:
        """First table entry a sliding group needs: the window of the next position computed
        (`num_computed_tokens`, or `num_received` when positions below it arrive remotely)."""
        return self._first_in_window(self.windows[group], max(request.num_computed_tokens, num_received))

    def _new_blocks(self, group: int, table: list[int], start: int, need: int) -> int:
        """Blocks a sliding group takes to make entries `start .. need - 1` real: the null
        entries there (a prefix of the table's nulls, left by a failed remote load that is now
        recomputed) and the appended ones."""
        i = start
        while i < min(len(table), need) and table[i] == NULL_BLOCK:
            i += 1
        return i - start + max(0, need - max(len(table), start))

    def can_allocate(
        self, request: Request, num_tokens: int, cached_ids: Sequence[Sequence[int]] = (), num_received: int = 0
    ) -> bool:
        """`cached_ids`: per group, as `match_prefix` gives them (for a request without blocks)."""
        need = self.blocks_needed(num_tokens)
        for g, free in enumerate(self._free):
            table = list(request.block_tables[g]) if request.block_tables else []
            cached = cached_ids[g] if cached_ids else []
            revived = sum(1 for b in self._real(g, cached) if self.pools[g][b].ref_count == 0)
            table += cached
            if self.windows[g] is None:
                new = max(need - len(table), 0)
            else:
                new = self._new_blocks(g, table, self._window_start(g, request, num_received), need)
            if new + revived > len(free):
                return False
        return True

    def allocate(
        self,
        request: Request,
        num_tokens: int,
        cached_ids: Sequence[Sequence[int]] = (),
        cached_hashes: Sequence[int] = (),
        num_received: int = 0,
    ) -> bool:
        """Give the request blocks for its first `num_tokens` tokens, starting with the matched
        prefix blocks (`match_prefix`'s, per group); positions below `num_received` arrive from a
        remote engine, so sliding groups get blocks only for the window of position
        `num_received` (null entries before), as for a matched prefix.

        Sliding groups first give back the blocks before the window of the request's next
        position: never needed again, so this holds whatever the answer. Returns False,
        changing nothing else, when a pool is short."""
        num_received = max(num_received, len(cached_hashes) * self.block_size)  # the prefix is there
        self._slide_windows(request, num_received)
        if not self.can_allocate(request, num_tokens, cached_ids, num_received):
            return False
        if not request.block_tables:
            request.block_tables = [[] for _ in self.pools]
        if cached_ids:
            assert not request.block_ids, "prefix blocks are only attached to a request without blocks"
            for g, ids in enumerate(cached_ids):
                for block_id in self._real(g, ids):
                    self._touch(g, block_id)
                    self.prefix_hit_blocks += 1
                request.block_tables[g].extend(ids)
            request.block_hashes = list(cached_hashes)
        if request.num_computed_tokens == 0:
            self.prefix_query_tokens += request.num_prompt_tokens
            self.prefix_hit_tokens += len(cached_hashes) * self.block_size
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
        """Register the request's full, computed blocks of every group in the prefix cache
        (a sliding group's null entries have nothing to register)."""
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
            for g, table in enumerate(request.block_tables):
                if not self._real(g, table[i : i + 1]):
                    continue
                block = self.pools[g][table[i]]
                if h in self._cached[g] or block.hash is not None:
                    continue  # the same prefix is already cached in another block
                block.hash, block.parent_hash, block.token_ids = h, parent, chunk
                self._cached[g][h] = block.block_id

    def free(self, request: Request) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        for g, table in enumerate(request.block_tables):
            for block_id in reversed(self._real(g, table)):
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

    def _touch(self, group: int, block_id: int) -> None:
        block = self.pools[group][block_id]
        if block.ref_count == 0:
            del self._free[group][block_id]
        block.ref_count += 1

    def _take_free(self, group: int) -> int:
        block_id, _ = self._free[group].popitem(last=False)
        block = self.pools[group][block_id]
        if block.hash is not None:
            if self._cached[group].get(block.hash) == block_id:
                del self._cached[group][block.hash]
            block.hash, block.parent_hash, block.token_ids = None, _ROOT_HASH, ()
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay allocated, just unshared from now on)."""
        for pool, cached in zip(self.pools, self._cached):
            for block_id in cached.values():
                block = pool[block_id]
                block.hash, block.parent_hash, block.token_ids = None, _ROOT_HASH, ()
            cached.clear()
