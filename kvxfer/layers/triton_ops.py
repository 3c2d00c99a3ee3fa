"""Triton attention ops for CUDA: KV-cache store and paged attention over the block-major cache.

Same functions and signatures as `kvxfer.layers.torch_ops` (see "Attention ops" in
docs/architecture.md). `kv_layer` is one layer's strided view `[num_blocks, H, 2 | 1, block_size, D]`
of the whole-model cache; kernels take its strides and never copy it.

- `store_kv`: one program per (token, kv head) scatters K and V (or the MLA latent) into its slot.
- `paged_attention`: batches whose sequences add at most one token go to the decode kernel (one
  program per sequence and KV head group, loading each K/V tile once for the group's query
  heads, optionally split along the context and merged by a second kernel); any other batch
  (prefill, chunked prefill over a cached prefix, mixed) goes to the prefill kernel (one program
  per query tile and query head, causal with offset `seq_len - q_len`).
- A sliding window `W` (a kernel argument, 0 for none) masks keys at or before `p - W` and starts
  each program's context loop at the first tile it can see (decode splits cover only the window).

Head dims need not be powers of two: K is read as a "main" part of `Dv` features (which, in
MLA's absorbed form, is also V: the first `v_dim` features of the latent) plus a "tail" of
`Dk - Dv` features (MLA's rope part), each padded to a power of two and masked.
"""

from __future__ import annotations

import functools

import torch
import triton

from kvxfer.layers import triton_kernels as kernels
from kvxfer.layers.attention_metadata import AttentionMetadata


_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # smallest tl.dot tile dimension on NVIDIA GPUs


def _pow2(n: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(n))


def store_kv(
    kv_layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, slot_mapping: torch.Tensor
) -> None:
    """Write new tokens' K/V (or, with `value=None` and one slot, the MLA latent) at `slot_mapping`.

    Slots are trusted (the engine computes them from its own block tables); a negative slot
    marks a padding token and is skipped.
    """
    _check_cache(kv_layer)
    _, heads, num_slots, block_size, head_size = kv_layer.shape
    if key.dim() != 3 or tuple(key.shape[1:]) != (heads, head_size):
        raise ValueError(f"key must be [T, {heads}, {head_size}] for this cache, got {tuple(key.shape)}")
    if (value is None) != (num_slots == 1):
        raise ValueError("value must be None exactly when the cache has one slot (MLA latent)")
    if value is not None and value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    if tuple(slot_mapping.shape) != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    _check_devices(kv_layer, key=key, value=value, slot_mapping=slot_mapping)
    if key.shape[0] == 0:
        return
    key = _unit_last_stride(key)
    value = key if value is None else _unit_last_stride(value)
    kernels.store_kv_kernel[(key.shape[0], heads)](
        key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1),
        kv_layer, *kv_layer.stride()[:4],
        slot_mapping, block_size, head_size,
        HAS_VALUE=num_slots == 2, BLOCK_D=triton.next_power_of_2(head_size),
    )


def paged_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    v_dim: int | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context -> [T, Hq, Dv]
    (within the last `sliding_window` positions of each query when given)."""
    if attn.max_query_len <= 1:
        return decode_attention(query, kv_layer, attn, scale, v_dim, sliding_window=sliding_window)
    return prefill_attention(query, kv_layer, attn, scale, v_dim, sliding_window)


def decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    v_dim: int | None = None,
    num_splits: int | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention` for batches adding at most one token per sequence.

    The context is cut into `num_splits` ranges (chosen from the SM count when None) whose
    partial results are merged by log-sum-exp, so few long sequences still fill the GPU.
    """
    if attn.max_query_len > 1:
        raise ValueError(f"decode attention takes at most one new token per sequence, got {attn.max_query_len}")
    query, out, dv, dt = _prepare(query, kv_layer, attn, v_dim)
    if out.shape[0] == 0:
        return out
    num_seqs, hq, heads = attn.num_seqs, query.shape[1], kv_layer.shape[1]
    group = hq // heads
    tiles = decode_tiles(group, dv, dt)
    head_programs = heads * triton.cdiv(group, tiles["BLOCK_G"])
    # The splits cut the context each token sees: the whole sequence, or its window.
    span = attn.max_seq_len if sliding_window is None else min(attn.max_seq_len, sliding_window)
    if num_splits is None:
        num_splits = _auto_splits(num_seqs * head_programs, span, query.device)
    per_split = triton.cdiv(triton.cdiv(max(span, 1), num_splits), tiles["BLOCK_N"]) * tiles["BLOCK_N"]
    num_splits = max(1, triton.cdiv(span, per_split))
    split = num_splits > 1
    if split:
        part = torch.empty((num_seqs, hq, num_splits, tiles["BLOCK_DV"]), dtype=torch.float32, device=query.device)
        lse = torch.empty((num_seqs, hq, num_splits), dtype=torch.float32, device=query.device)
    else:
        part = lse = out  # unused
    block_tables = attn.block_tables.contiguous()
    kernels.decode_kernel[(num_seqs, head_programs, num_splits)](
        query, query.stride(0), query.stride(1),
        kv_layer, *kv_layer.stride()[:4],
        block_tables, block_tables.stride(0), attn.seq_lens, attn.query_start_loc,
        out, out.stride(0), out.stride(1),
        part, lse,
        scale * _LOG2E, kv_layer.shape[3], hq, group, dv, dt, per_split, sliding_window or 0,
        HAS_TAIL=dt > 0, SHARED_V=kv_layer.shape[2] == 1, SPLIT=split, DOT_PREC=_dot_precision(kv_layer), **tiles,
    )
    if split:
        kernels.merge_splits_kernel[(num_seqs, hq)](
            part, lse, attn.query_start_loc, out, out.stride(0), out.stride(1), hq, num_splits, dv,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_DV=tiles["BLOCK_DV"],
        )
    return out


def prefill_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    v_dim: int | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention` for any batch: prefill, chunked prefill over a cached prefix, decode, mixed."""
    query, out, dv, dt = _prepare(query, kv_layer, attn, v_dim)
    if out.shape[0] == 0:
        return out
    hq, heads = query.shape[1], kv_layer.shape[1]
    tiles = prefill_tiles(dv, dt)
    block_tables = attn.block_tables.contiguous()
    kernels.prefill_kernel[(attn.num_seqs, triton.cdiv(attn.max_query_len, tiles["BLOCK_M"]), hq)](
        query, query.stride(0), query.stride(1),
        kv_layer, *kv_layer.stride()[:4],
        block_tables, block_tables.stride(0), attn.seq_lens, attn.query_start_loc,
        out, out.stride(0), out.stride(1),
        scale * _LOG2E, kv_layer.shape[3], hq // heads, dv, dt, sliding_window or 0,
        HAS_TAIL=dt > 0, SHARED_V=kv_layer.shape[2] == 1, DOT_PREC=_dot_precision(kv_layer), **tiles,
    )
    return out


# Tile sizes: the tests compile these for sm_90 and check ptxas reports no register spills.
def decode_tiles(group: int, dv: int, dt: int) -> dict[str, int]:
    """Decode kernel tiles for `group` query heads per KV head, V width `dv`, K tail width `dt`."""
    block_dv = _pow2(dv)
    wide = block_dv > 128
    return {
        "BLOCK_G": min(_pow2(group), 16 if wide else 32), "BLOCK_N": 32 if wide else 64,
        "BLOCK_DV": block_dv, "BLOCK_DT": _pow2(dt), "num_warps": 8 if wide else 4,
    }


def prefill_tiles(dv: int, dt: int) -> dict[str, int]:
    """Prefill kernel tiles for V width `dv` and K tail width `dt`."""
    block_dv = _pow2(dv)
    return {
        "BLOCK_M": 64 if block_dv <= 256 else 32, "BLOCK_N": 64 if block_dv <= 128 else 32,
        "BLOCK_DV": block_dv, "BLOCK_DT": _pow2(dt), "num_warps": 4 if block_dv <= 128 else 8,
    }


def _prepare(
    query: torch.Tensor, kv_layer: torch.Tensor, attn: AttentionMetadata, v_dim: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate shapes; return the query (unit last stride), the output, Dv and the K tail width."""
    _check_cache(kv_layer)
    _, heads, num_slots, _, head_size = kv_layer.shape
    if query.dim() != 3 or query.shape[2] != head_size:
        raise ValueError(f"query must be [T, Hq, {head_size}] for this cache, got {tuple(query.shape)}")
    if query.shape[1] % heads:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {heads} KV heads")
    if query.shape[0] != attn.num_tokens:
        raise ValueError(f"query has {query.shape[0]} tokens, the metadata {attn.num_tokens}")
    if num_slots == 1:
        if v_dim is None or not 0 < v_dim <= head_size:
            raise ValueError(f"a one-slot (MLA) cache needs 0 < v_dim <= {head_size}, got {v_dim}")
        dv = v_dim
    else:
        if v_dim not in (None, head_size):
            raise ValueError(f"v_dim {v_dim} must be None or {head_size} for a K/V cache")
        dv = head_size
    _check_devices(
        kv_layer, query=query, seq_lens=attn.seq_lens, block_tables=attn.block_tables,
        query_start_loc=attn.query_start_loc,
    )
    out = torch.empty((query.shape[0], query.shape[1], dv), dtype=query.dtype, device=query.device)
    return _unit_last_stride(query), out, dv, head_size - dv


def _check_cache(kv_layer: torch.Tensor) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[2] not in (1, 2):
        raise ValueError(f"kv_layer must be [num_blocks, H, 2 | 1, block_size, D], got {tuple(kv_layer.shape)}")
    if kv_layer.stride(4) != 1:
        raise ValueError("kv_layer's head dimension must be contiguous (a per-layer view of the cache)")


def _check_devices(kv_layer: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != kv_layer.device:
            raise ValueError(f"{name} is on {tensor.device}, the cache on {kv_layer.device}")


def _unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _dot_precision(kv_layer: torch.Tensor) -> str:
    # fp32 caches (tests, debugging) get exact products; fp16/bf16 ignore the setting.
    return "ieee" if kv_layer.dtype == torch.float32 else "tf32"


def _auto_splits(programs: int, max_seq_len: int, device: torch.device) -> int:
    """Enough context splits to give every SM about two programs, at least 256 tokens each."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_seq_len // 256, 16))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
