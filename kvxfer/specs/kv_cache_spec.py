"""KV cache specs: per-rank cache layout, sizes and TP transfer slices of one model.

Owns the byte math of the whole-model block layout (one tensor per TP rank,
`[num_blocks, heads_local, num_layers, kv_slots, block_size, head_size]`) and
exposes the head-partition plan of `tp_slices` per spec. Pure Python: dtypes are
names ("float32", "bfloat16", ...), never torch objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import kvxfer.specs.tp_slices as tp_slices
from kvxfer.specs.tp_slices import TPTransferSlice

DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name; ValueError for names not in DTYPE_ITEMSIZE."""
    try:
        return DTYPE_ITEMSIZE[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"unknown KV cache dtype {dtype!r}; known: {sorted(DTYPE_ITEMSIZE)}") from None


def _check_positive(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _check_non_negative(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}.{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class KVCacheSpec:
    """KV cache of one model, built from model totals (`num_kv_heads` over all ranks).

    `dtype` is a name such as "bfloat16"; a "torch." prefix is dropped. Local means
    the decode side, remote the prefill side. Every method taking a TP size raises a
    ValueError naming H and tp when the size neither splits nor replicates the heads.
    """

    num_kv_heads: int
    head_size: int
    num_layers: int
    block_size: int
    dtype: str

    kv_slots: ClassVar[int] = 2  # K and V

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("num_kv_heads", "head_size", "num_layers", "block_size"):
            _check_positive(owner, name, getattr(self, name))
        if isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", self.dtype.removeprefix("torch."))
        dtype_itemsize(self.dtype)

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    def validate_tp(self, tp_size: int) -> None:
        tp_slices.validate_tp(self.num_kv_heads, tp_size)

    def heads_per_rank(self, tp_size: int) -> int:
        """KV heads in one rank's tensor: H // tp, or 1 when heads are replicated (tp > H)."""
        return tp_slices.heads_per_rank(self.num_kv_heads, tp_size)

    def head_range(self, tp_rank: int, tp_size: int) -> range:
        """Global head numbers held by `tp_rank`."""
        return tp_slices.head_range(self.num_kv_heads, tp_rank, tp_size)

    def block_shape(self, tp_size: int) -> tuple[int, int, int, int, int]:
        """Shape of one block of a rank's cache tensor (the tensor is `(num_blocks, *this)`)."""
        return (self.heads_per_rank(tp_size), self.num_layers, self.kv_slots, self.block_size, self.head_size)

    def bytes_per_head_block(self) -> int:
        """One head of one block over all layers: one contiguous run, one descriptor."""
        return self.num_layers * self.kv_slots * self.block_size * self.head_size * self.itemsize

    def bytes_per_block(self, tp_size: int) -> int:
        """One block of one rank, all layers together."""
        return self.heads_per_rank(tp_size) * self.bytes_per_head_block()

    def page_size_bytes(self, tp_size: int) -> int:
        """One block of one rank for one layer."""
        return self.bytes_per_block(tp_size) // self.num_layers

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks a request with a context of `num_tokens` must hold while it computes its newest
        token (position `num_tokens - 1`); full attention: every block of the context."""
        _check_non_negative(type(self).__name__, "num_tokens", num_tokens)
        return -(-num_tokens // self.block_size)

    def max_blocks_needed(self, max_tokens: int) -> int:
        """An upper bound of `blocks_needed(n)` over `n <= max_tokens` (what pools are sized by)."""
        return KVCacheSpec.blocks_needed(self, max_tokens)  # the whole context, in any subclass

    def blocks_to_read(self, num_received_tokens: int) -> range:
        """Indexes into a request's block table that a decode side must read when positions
        `0 .. num_received_tokens - 1` come from the prefill side and it computes the next
        position itself (full attention: all of them)."""
        _check_non_negative(type(self).__name__, "num_received_tokens", num_received_tokens)
        return range(-(-num_received_tokens // self.block_size))

    def get_tp_transfer_slices(
        self, local_tp_rank: int, local_tp_size: int, remote_tp_size: int
    ) -> list[TPTransferSlice]:
        """The reads that fill exactly decode rank `local_tp_rank`'s heads, in local head order.

        Each head is read once; replicated prefill heads are read round-robin over
        their replicas; consecutive heads from one prefill rank form one slice.
        """
        plan = tp_slices.transfer_plan(self.num_kv_heads, local_tp_size, remote_tp_size)
        tp_slices.check_rank(local_tp_rank, local_tp_size, "local_tp_rank")
        return list(plan.slices[local_tp_rank])

    def notify_targets(self, local_tp_rank: int, local_tp_size: int, remote_tp_size: int) -> list[int]:
        """Prefill ranks that decode rank `local_tp_rank` notifies when its reads are done.

        Every rank it reads from, plus the unread replicas assigned to it; over all
        decode ranks the targets cover every prefill rank.
        """
        plan = tp_slices.transfer_plan(self.num_kv_heads, local_tp_size, remote_tp_size)
        tp_slices.check_rank(local_tp_rank, local_tp_size, "local_tp_rank")
        return list(plan.notify[local_tp_rank])

    def consumers(self, remote_tp_rank: int, local_tp_size: int, remote_tp_size: int) -> list[int]:
        """Decode ranks that notify prefill rank `remote_tp_rank`: it frees blocks after that many."""
        plan = tp_slices.transfer_plan(self.num_kv_heads, local_tp_size, remote_tp_size)
        tp_slices.check_rank(remote_tp_rank, remote_tp_size, "remote_tp_rank")
        return list(plan.consumers[remote_tp_rank])


@dataclass(frozen=True)
class FullAttentionSpec(KVCacheSpec):
    """Full causal attention with K and V per KV head (MHA/GQA)."""


@dataclass(frozen=True)
class SlidingWindowSpec(KVCacheSpec):
    """Sliding-window attention: same layout and transfers as full attention, plus `sliding_window` tokens."""

    sliding_window: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(type(self).__name__, "sliding_window", self.sliding_window)

    def blocks_needed(self, num_tokens: int) -> int:
        """The newest token (position `n - 1`) sees positions `max(0, n - W) .. n - 1`: the blocks
        holding them; earlier blocks may be freed."""
        full = super().blocks_needed(num_tokens)
        return full - max(0, num_tokens - self.sliding_window) // self.block_size if num_tokens else 0

    def max_blocks_needed(self, max_tokens: int) -> int:
        """`W` positions span at most `ceil((W - 1) / block_size) + 1` blocks (when the window
        starts mid-block), and never more than the whole context does."""
        window_blocks = -(-(self.sliding_window - 1) // self.block_size) + 1
        return min(super().max_blocks_needed(max_tokens), window_blocks)

    def blocks_to_read(self, num_received_tokens: int) -> range:
        """Position `n = num_received_tokens` sees keys in `(n - W, n]`: the received positions
        `max(0, n - W + 1) .. n - 1`, so the blocks holding them and none before."""
        full = super().blocks_to_read(num_received_tokens)
        first = max(0, num_received_tokens - self.sliding_window + 1)
        if first >= num_received_tokens:  # a window of 1 sees only the position being computed
            return range(full.stop, full.stop)
        return range(first // self.block_size, full.stop)


@dataclass(frozen=True)
class MLAAttentionSpec(KVCacheSpec):
    """Multi-head latent attention: one latent vector per token, replicated on every rank.

    Construct with `num_kv_heads=1` and `head_size=kv_lora_rank + qk_rope_head_dim`
    (the cached `[latent | rope]` row); anything but one head is rejected. Any TP size
    is valid, every rank holds head range(0, 1), and a decode rank reads the whole
    latent block from one prefill rank.
    """

    kv_slots: ClassVar[int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_kv_heads != 1:
            raise ValueError(
                f"MLAAttentionSpec caches one latent per token: num_kv_heads must be 1, got "
                f"{self.num_kv_heads} (head_size is kv_lora_rank + qk_rope_head_dim)"
            )


def num_blocks_for(spec: KVCacheSpec, available_bytes: int, tp_size: int) -> int:
    """Blocks of the whole-model layout that fit in `available_bytes` of one rank.

    One block holds every layer (`spec.bytes_per_block(tp_size)`). A per-layer pool
    counts pages of `page_size_bytes` in one layer's tensor instead, so dividing the
    same memory by the page size gives num_layers times as many "blocks", and
    per-layer engines size each layer (or layer group, e.g. sliding-window layers)
    separately, so their counts can differ per layer. Here a block id means the same
    tokens in every layer, and the pool is sized for all layers at once.
    """
    if not isinstance(available_bytes, int) or isinstance(available_bytes, bool) or available_bytes < 0:
        raise ValueError(f"available_bytes must be a non-negative int, got {available_bytes!r}")
    return available_bytes // spec.bytes_per_block(tp_size)
