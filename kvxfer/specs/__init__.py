"""KV cache specs, KV head partitioning over TP ranks, TP transfer slices, block-count math, and
KV cache groups of hybrid models.

Pure Python: nothing here imports torch.
"""

from kvxfer.specs.kv_cache_groups import KVCacheGroup, group_layers, split_num_blocks
from kvxfer.specs.kv_cache_spec import (
    DTYPE_ITEMSIZE,
    FullAttentionSpec,
    KVCacheSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
    dtype_itemsize,
    num_blocks_for,
)
from kvxfer.specs.tp_slices import TPTransferSlice

__all__ = [
    "DTYPE_ITEMSIZE",
    "FullAttentionSpec",
    "KVCacheGroup",
    "KVCacheSpec",
    "MLAAttentionSpec",
    "SlidingWindowSpec",
    "TPTransferSlice",
    "dtype_itemsize",
    "group_layers",
    "num_blocks_for",
    "split_num_blocks",
]
