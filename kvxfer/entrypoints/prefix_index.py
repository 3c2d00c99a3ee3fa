"""The proxy's approximate prefix index: block-aligned chained hashes of a prompt, and per server
an LRU set of the block hashes it has been sent, bounded by that server's KV cache size.

Why chained block hashes (as the engine's prefix cache, `block_manager.chain_hash`) and not a
text radix tree (SGLang's router): the engine caches whole blocks of token ids, and a block's KV
depends on everything before it, so "server S may hold this prompt's first k blocks" is exactly
"S was sent the first k chained hashes"; a radix tree over text matches characters the engine
cannot reuse (a partial block, or text that tokenizes differently at a boundary), and costs a
tree walk and node splits where this costs one dict lookup per block. Eviction follows the
engine's: least recently used blocks go first once a server's index holds more blocks than its
pool (`kvxfer_kv_blocks` from its /metrics, else `--index-blocks`). The index is approximate:
the engine evicts by its own LRU under its own load, so a match is a likely hit, not a promise;
a wrong guess costs only speed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROOT_HASH = 0


def block_hashes(keys: Sequence[int] | Sequence[str], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `keys` (token ids, or characters when the proxy has
    no tokenizer): hash i names keys[0 : (i + 1) * block_size]. The partial last block has none
    (the engine caches only full blocks)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(keys) - block_size + 1, block_size):
        parent = hash((parent, tuple(keys[start:start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """The block hashes one server was sent, least recently used first."""

    def __init__(self, capacity_blocks: int):
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` this server was sent (a chain: the first miss ends
        the match, as the engine's lookup does)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record that the server now computes (and caches) these blocks: most recent last, then
        evict the oldest beyond the capacity."""
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        self._evict()

    def resize(self, capacity_blocks: int) -> None:
        """Track the server's reported pool size."""
        if capacity_blocks > 0 and capacity_blocks != self.capacity_blocks:
            self.capacity_blocks = capacity_blocks
            self._evict()

    def clear(self) -> None:
        """Forget everything (the server went down: a restarted one has an empty cache)."""
        self._blocks.clear()

    def _evict(self) -> None:
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
