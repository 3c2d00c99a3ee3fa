"""KV cache specs, KV head partitioning over TP ranks, TP transfer slices and block-count math.

Pure Python: nothing here imports torch.
"""

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
    "KVCacheSpec",
    "MLAAttentionSpec",
    "SlidingWindowSpec",
    "TPTransferSlice",
    "dtype_itemsize",
    "num_blocks_for",
]
