"""Paged KV block pool: ref-counted blocks and a prefix cache keyed by chained block hashes.

A full block's hash chains its parent's hash with its own tokens, so equal hashes mean
equal prefixes; the tokens and the parent hash are compared too, so a hash collision
can never hand out another prefix's KV. Freed blocks keep their hash and stay findable
until they are handed out again; uncached free blocks are handed out first, then cached
ones in least-recently-freed order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvxfer.engine.request import Request

_ROOT_HASH = -1


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
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefix_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

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

    def can_allocate(self, request: Request, num_tokens: int, cached_ids: Sequence[int] = ()) -> bool:
        revived = sum(1 for b in cached_ids if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(num_tokens) - len(request.block_ids) - len(cached_ids)
        return max(new, 0) + revived <= len(self._free)

    def allocate(
        self,
        request: Request,
        num_tokens: int,
        cached_ids: Sequence[int] = (),
        cached_hashes: Sequence[int] = (),
    ) -> bool:
        """Give the request blocks for its first `num_tokens` tokens, starting with the
        matched prefix blocks. Returns False, changing nothing, when the pool is short."""
        if not self.can_allocate(request, num_tokens, cached_ids):
            return False
        if cached_ids:
            assert not request.block_ids, "prefix blocks are only attached to a request without blocks"
            for block_id in cached_ids:
                self._touch(block_id)
            request.block_ids.extend(cached_ids)
            request.block_hashes = list(cached_hashes)
            self.prefix_hit_blocks += len(cached_ids)
        if request.num_computed_tokens == 0:
            self.prefix_query_tokens += request.num_prompt_tokens
            self.prefix_hit_tokens += len(cached_ids) * self.block_size
        while len(request.block_ids) < self.blocks_needed(num_tokens):
            request.block_ids.append(self._take_free())
        return True

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
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        request.block_hashes = []

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
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
