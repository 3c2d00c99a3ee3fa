"""Attention ops in plain torch: the CPU backend and the reference for the Triton kernels.

`kv_layer` is one layer's strided view of the rank's cache, `[num_blocks, heads, 2 | 1,
block_size, head_size]`; nothing here copies the cache beyond gathering a sequence's blocks.
With a sliding window `W` (HF's convention) a query at position `p` sees keys in `(p - W, p]`,
and blocks wholly before the earliest visible key are not gathered. Prefills run one SDPA call
each (mask-free causal when the sequence has no cached prefix); decodes run batched in chunks,
from gather plans built once per step (figures: docs/benchmarks.md, "Attention (CPU)").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvxfer.layers.attention_metadata import AttentionMetadata
from kvxfer.layers.linear import bfloat16_matmul_is_slow


# Upper bound on gathered context elements per batched-decode chunk (8 MB of float32 K and V).
# Measured on CPU (`python -m kvxfer.bench.attention`, docs/benchmarks.md): chunks of 64M elements,
# one huge fresh buffer per layer, are 2-4x slower at qwen3-0.6b's shape; chunks of 256K pay a
# per-chunk overhead at tiny shapes; 2M is at or near the best for both.
_DECODE_CHUNK_ELEMENTS = 1 << 21

# A bfloat16 prefill of at least this many new tokens runs its SDPA in float32 where bfloat16
# matmuls are slow (`linear.bfloat16_matmul_is_slow`): the CPU flash kernel measured 1.1x
# faster in float32 at 256 tokens, 1.6x at 1024, and 0.88x at 128 (qwen3-0.6b heads, one
# thread). The upcast is exact; only the output is rounded back, as the bfloat16 kernel does.
_FLOAT32_PREFILL_MIN_TOKENS = 256


def store_kv(
    kv_layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, slot_mapping: torch.Tensor
) -> None:
    """Write `key`/`value` `[T, heads, head_size]` at `slot_mapping` `[T]`; MLA passes `value=None`.
    A negative slot marks a padding token and is skipped."""
    if (value is None) != (kv_layer.shape[2] == 1):
        raise ValueError(
            f"store_kv: a cache with {kv_layer.shape[2]} slot(s) per token needs "
            f"{'no value (MLA latent only)' if kv_layer.shape[2] == 1 else 'a value tensor'}"
        )
    if (slot_mapping < 0).any():  # padding tokens (CUDA-graph batches): nothing to store
        keep = slot_mapping >= 0
        slot_mapping, key = slot_mapping[keep], key[keep]
        value = None if value is None else value[keep]
    block_size = kv_layer.shape[3]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_layer[blocks, :, 0, offsets] = key.to(kv_layer.dtype)
    if value is not None:
        kv_layer[blocks, :, 1, offsets] = value.to(kv_layer.dtype)


def paged_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    v_dim: int | None = None,
    sliding_window: int | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context.

    `query` is `[T, Hq, Dk]`; query head `h` uses KV head `h // (Hq // H)`. With one slot per
    token (MLA, absorbed form) K is the cached latent and V its first `v_dim` features.
    `sliding_window` `W`: position `p` attends to keys `p - W + 1 .. p` only. `new_kv`: this
    step's K and V `[T, H, D]`, as just stored: a prefill with no cached prefix attends to them
    in place instead of gathering them back from the cache. Returns `[T, Hq, Dv]`.
    """
    num_slots = kv_layer.shape[2]
    if num_slots == 1 and v_dim is None:
        raise ValueError("paged_attention: a single-slot (MLA) cache needs v_dim")
    out_dim = v_dim if num_slots == 1 else kv_layer.shape[4]
    out = query.new_empty(query.shape[0], query.shape[1], out_dim)
    starts = attn.query_start_loc_host
    # The stored copy equals the new K/V only when the cache keeps their dtype.
    if new_kv is not None and (num_slots == 1 or new_kv[0].dtype != kv_layer.dtype):
        new_kv = None
    for b in attn.multi_token_seqs:
        start, end = starts[b], starts[b + 1]
        fresh = None if new_kv is None else (new_kv[0][start:end], new_kv[1][start:end])
        out[start:end] = _attend_one(query[start:end], kv_layer, attn, b, scale, out_dim, sliding_window, fresh)
    for plan in _decode_plans(attn, kv_layer, sliding_window):
        keys, values = _gather_rows(kv_layer, plan.rows, plan.shape, out_dim)
        if isinstance(plan.tokens, slice):
            out[plan.tokens] = _attend(query[plan.tokens].unsqueeze(2), keys, values, plan.mask, scale).squeeze(2)
        else:
            rows = query.index_select(0, plan.tokens).unsqueeze(2)
            out.index_copy_(0, plan.tokens, _attend(rows, keys, values, plan.mask, scale).squeeze(2))
    return out


def first_visible_block(seq_len: int, q_len: int, block_size: int, sliding_window: int | None) -> int:
    """The first block holding a key that the sequence's earliest new token can see."""
    if sliding_window is None:
        return 0
    return max(0, seq_len - q_len - sliding_window + 1) // block_size


@dataclass(frozen=True)
class _DecodePlan:
    """One chunk of one-token sequences: which query rows, which cache tiles, which keys count.

    Identical for every layer of a step (same block tables, same KV-head count), so it is built
    once per step and kept on the metadata instead of being rebuilt with a dozen small tensor
    ops in each layer.
    """

    tokens: slice | torch.Tensor  # query rows: a slice when the chunk's tokens are contiguous
    rows: torch.Tensor  # [B * H * nb] tile rows `block * H + head`, see `_gather_rows`
    shape: tuple[int, int, int]  # (B, H, nb * block_size)
    mask: torch.Tensor  # [B, 1, L] bool: key visible (inside the context and the window)


def _decode_plans(
    attn: AttentionMetadata, kv_layer: torch.Tensor, sliding_window: int | None
) -> list[_DecodePlan]:
    _, heads, num_slots, block_size, head_size = kv_layer.shape
    key = (heads, num_slots * head_size, block_size, sliding_window)
    plans = attn.plan_cache.get(key)
    if plans is None:
        plans = attn.plan_cache[key] = _build_decode_plans(attn, kv_layer, sliding_window)
    return plans


def _build_decode_plans(
    attn: AttentionMetadata, kv_layer: torch.Tensor, sliding_window: int | None
) -> list[_DecodePlan]:
    """One-token sequences, batched: contexts padded to the longest in a chunk, padding masked.

    With a window each sequence gathers only its blocks from `first_visible_block` on, so the
    gathered width is bounded by the window, not by the longest context. Chunks bound the
    gathered bytes (temporary memory).
    """
    seqs = attn.single_token_seqs
    if not seqs:
        return []
    _, heads, num_slots, block_size, head_size = kv_layer.shape
    device = kv_layer.device
    lens, starts, tables = attn.seq_lens_host, attn.query_start_loc_host, attn.block_tables_host
    firsts = [first_visible_block(lens[b], 1, block_size, sliding_window) for b in seqs]
    spans = [-(-lens[b] // block_size) - f for b, f in zip(seqs, firsts)]
    per_seq = max(spans) * block_size * heads * num_slots * head_size
    chunk = max(1, _DECODE_CHUNK_ELEMENTS // per_seq)
    plans = []
    for i in range(0, len(seqs), chunk):
        group, group_firsts = seqs[i : i + chunk], firsts[i : i + chunk]
        num_blocks = max(spans[i : i + chunk])
        # Built on the host from the host tables (no device syncs); columns past a sequence's
        # table reuse its first block, the mask hides them.
        blocks = []
        for b, first in zip(group, group_firsts):
            table = tables[b][first : first + num_blocks]
            blocks.append(table + [table[0]] * (num_blocks - len(table)))
        tokens_host = [starts[b] for b in group]
        if tokens_host == list(range(tokens_host[0], tokens_host[0] + len(group))):
            tokens: slice | torch.Tensor = slice(tokens_host[0], tokens_host[0] + len(group))
        else:
            tokens = torch.tensor(tokens_host, device=device)
        block_ids = torch.tensor(blocks, dtype=torch.long, device=device)
        pos = torch.tensor([f * block_size for f in group_firsts], device=device)[:, None] + torch.arange(
            num_blocks * block_size, device=device
        )
        seq_lens = torch.tensor([lens[b] for b in group], device=device)[:, None]
        mask = pos < seq_lens
        if sliding_window is not None:
            mask &= pos >= seq_lens - sliding_window
        shape = (len(group), heads, num_blocks * block_size)
        plans.append(_DecodePlan(tokens, _tile_rows(block_ids, heads), shape, mask[:, None, :]))
    return plans


def _tile_rows(block_ids: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows `block * H + head` of `block_ids` (`[nb]` or `[B, nb]`), head-major per sequence."""
    heads_axis = torch.arange(heads, device=block_ids.device).unsqueeze(-1)
    return (block_ids.long().unsqueeze(-2) * heads + heads_axis).reshape(-1)


def _gather_rows(kv_layer: torch.Tensor, rows: torch.Tensor, shape: tuple[int, ...], out_dim: int):
    """K and V of the tiles `rows` (see `_tile_rows`) as `[*shape, D]`.

    The cache is block-major then head-major, so a layer view's (block, head) axes merge into
    one strided axis of whole `[block_size, D]` tiles (a view, no copy). One `index_select` of the
    rows `block * H + head`, taken head-major, lands each head's tokens contiguous: one memcpy-speed
    copy per slot (none for MLA's V, a view of K), where advanced indexing is several times slower.
    """
    num_blocks, heads, _, block_size, head_size = kv_layer.shape

    def flat(slot: int) -> torch.Tensor:
        tiles = kv_layer[:, :, slot].reshape(num_blocks * heads, block_size * head_size)
        return tiles.index_select(0, rows).view(*shape, head_size)

    keys = flat(0)
    values = keys[..., :out_dim] if kv_layer.shape[2] == 1 else flat(1)
    return keys, values


def _attend(query, keys, values, mask, scale):
    """`query` `[(B,) Hq, Q, Dk]` over `keys`/`values` `[(B,) H, L, D]` with `mask` `[(B,) Q, L]`.

    The `Hq // H` query heads sharing a KV head are folded into the query rows, so K and V
    are never repeated per query head.
    """
    *lead, num_q_heads, q_len, _ = query.shape
    heads = keys.shape[-3]
    group = num_q_heads // heads
    query = query.reshape(*lead, heads, group * q_len, query.shape[-1])
    mask = mask.unsqueeze(-3).expand(*lead, group, q_len, mask.shape[-1]).reshape(*lead, 1, group * q_len, -1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(*lead, num_q_heads, q_len, out.shape[-1])


def _attend_one(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    attn: AttentionMetadata,
    b: int,
    scale: float,
    out_dim: int,
    sliding_window: int | None,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A multi-token sequence (prefill, chunked prefill) over its visible blocks; `fresh`: its
    new K and V `[q_len, H, D]`, attended in place when they are its whole context."""
    q_len = query.shape[0]
    seq_len = attn.seq_lens_host[b]
    block_size, heads = kv_layer.shape[3], kv_layer.shape[1]
    if sliding_window is not None and sliding_window >= seq_len:
        sliding_window = None  # the window hides nothing: take the unmasked path when it applies
    first = first_visible_block(seq_len, q_len, block_size, sliding_window)
    if fresh is not None and q_len == seq_len:
        # No cached prefix: the context is this step's K/V, head-major views (no copy).
        keys, values, offset = fresh[0].transpose(0, 1), fresh[1].transpose(0, 1), 0
    else:
        num_blocks = -(-seq_len // block_size)
        block_ids = torch.tensor(attn.block_tables_host[b][first:num_blocks], device=query.device)
        shape = (heads, (num_blocks - first) * block_size)
        keys, values = _gather_rows(kv_layer, _tile_rows(block_ids, heads), shape, out_dim)
        offset = first * block_size  # position of the first gathered key
        keys, values = keys[:, : seq_len - offset], values[:, : seq_len - offset]
    # SDPA gets 4-D tensors (a batch of one): torch's CPU flash kernel takes only those, 3-D
    # inputs fall back to the math path, about 10x slower on a 1024-token prefill. GQA through
    # `enable_gqa`: the kernel shares each KV head among its query heads, nothing is copied.
    query, keys, values = query.transpose(0, 1)[None], keys[None], values[None]
    if q_len == seq_len and sliding_window is None:
        # Only its own tokens, no window: the plain causal triangle, which the flash kernel
        # takes without a mask and skips the masked half of.
        mask = None
    else:
        # Query i sits at position seq_len - q_len + i and sees every key up to it (within the window).
        rows = torch.arange(q_len, device=query.device)[:, None] + (seq_len - q_len)
        pos = torch.arange(offset, seq_len, device=query.device)[None, :]
        mask = pos <= rows
        if sliding_window is not None:
            mask &= pos > rows - sliding_window
    dtype = query.dtype
    if dtype == torch.bfloat16 and q_len >= _FLOAT32_PREFILL_MIN_TOKENS and bfloat16_matmul_is_slow(query.device):
        query, keys, values = query.float(), keys.float(), values.float()
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1).to(dtype)
