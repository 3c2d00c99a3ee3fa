"""Attention ops in plain torch: the CPU backend and the reference for the Triton kernels.

`kv_layer` is one layer's strided view of the rank's cache, `[num_blocks, heads, 2 | 1,
block_size, head_size]`; nothing here copies the cache beyond gathering a sequence's blocks.
With a sliding window `W` (HF's convention) a query at position `p` sees keys in `(p - W, p]`,
and blocks wholly before the earliest visible key are not gathered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvxfer.layers.attention import AttentionMetadata

# Upper bound on gathered context elements per batched-decode chunk (bounds temporary memory).
_DECODE_CHUNK_ELEMENTS = 1 << 26


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
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context.

    `query` is `[T, Hq, Dk]`; query head `h` uses KV head `h // (Hq // H)`. With one slot per
    token (MLA, absorbed form) K is the cached latent and V its first `v_dim` features.
    `sliding_window` `W`: position `p` attends to keys `p - W + 1 .. p` only. Returns `[T, Hq, Dv]`.
    """
    num_slots = kv_layer.shape[2]
    if num_slots == 1 and v_dim is None:
        raise ValueError("paged_attention: a single-slot (MLA) cache needs v_dim")
    out_dim = v_dim if num_slots == 1 else kv_layer.shape[4]
    out = query.new_empty(query.shape[0], query.shape[1], out_dim)
    starts = attn.query_start_loc_host
    decodes, others = [], []
    for b in range(len(attn.seq_lens_host)):
        q_len = starts[b + 1] - starts[b]
        if q_len == 1:
            decodes.append(b)
        elif q_len > 1:
            others.append(b)
    for b in others:
        start, end = starts[b], starts[b + 1]
        out[start:end] = _attend_one(query[start:end], kv_layer, attn, b, scale, out_dim, sliding_window)
    if decodes:
        _attend_decodes(query, kv_layer, attn, decodes, scale, out_dim, out, sliding_window)
    return out


def first_visible_block(seq_len: int, q_len: int, block_size: int, sliding_window: int | None) -> int:
    """The first block holding a key that the sequence's earliest new token can see."""
    if sliding_window is None:
        return 0
    return max(0, seq_len - q_len - sliding_window + 1) // block_size


def _gather_context(kv_layer: torch.Tensor, block_ids: torch.Tensor, out_dim: int):
    """K and V of `block_ids` (`[nb]` or `[B, nb]`) as `[(B,) H, nb * block_size, D]`.

    The cache is block-major then head-major, so a layer view's (block, head) axes merge into
    one strided axis of whole `[block_size, D]` tiles (a view, no copy). One `index_select` of the
    rows `block * H + head`, taken head-major, lands each head's tokens contiguous: one memcpy-speed
    copy per slot (none for MLA's V, a view of K), where advanced indexing is several times slower.
    """
    num_blocks, heads, _, block_size, head_size = kv_layer.shape
    lead = block_ids.shape[:-1]
    heads_axis = torch.arange(heads, device=block_ids.device).unsqueeze(-1)
    rows = (block_ids.long().unsqueeze(-2) * heads + heads_axis).reshape(-1)  # [(B,) H, nb] flattened
    shape = (*lead, heads, block_ids.shape[-1] * block_size, head_size)

    def flat(slot: int) -> torch.Tensor:
        tiles = kv_layer[:, :, slot].reshape(num_blocks * heads, block_size * head_size)
        return tiles.index_select(0, rows).view(shape)

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
) -> torch.Tensor:
    q_len = query.shape[0]
    seq_len = attn.seq_lens_host[b]
    block_size = kv_layer.shape[3]
    num_blocks = -(-seq_len // block_size)
    first = first_visible_block(seq_len, q_len, block_size, sliding_window)
    keys, values = _gather_context(kv_layer, attn.block_tables[b, first:num_blocks], out_dim)
    offset = first * block_size  # position of the first gathered key
    keys, values = keys[:, : seq_len - offset], values[:, : seq_len - offset]
    # Query i sits at position seq_len - q_len + i and sees every key up to it (within the window).
    rows = torch.arange(q_len, device=query.device)[:, None] + (seq_len - q_len)
    pos = torch.arange(offset, seq_len, device=query.device)[None, :]
    mask = pos <= rows
    if sliding_window is not None:
        mask &= pos > rows - sliding_window
    return _attend(query.transpose(0, 1), keys, values, mask, scale).transpose(0, 1)


def _attend_decodes(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    attn: AttentionMetadata,
    seqs: list[int],
    scale: float,
    out_dim: int,
    out: torch.Tensor,
    sliding_window: int | None,
) -> None:
    """One-token sequences, batched: gather contexts padded to the longest and mask the padding.

    With a window each sequence gathers only its blocks from `first_visible_block` on, so the
    gathered width is bounded by the window, not by the longest context.
    """
    block_size = kv_layer.shape[3]
    lens_host = attn.seq_lens_host  # host side: no sync
    firsts = {b: first_visible_block(lens_host[b], 1, block_size, sliding_window) for b in seqs}
    spans = {b: -(-lens_host[b] // block_size) - firsts[b] for b in seqs}
    per_seq = max(spans.values()) * block_size * kv_layer[0, :, :, 0].numel()
    chunk = max(1, _DECODE_CHUNK_ELEMENTS // max(per_seq, 1))
    width = attn.block_tables.shape[1]
    for i in range(0, len(seqs), chunk):
        group = seqs[i : i + chunk]
        num_blocks = max(spans[b] for b in group)
        index = torch.tensor(group, device=query.device)
        lens = attn.seq_lens[index]
        tokens = attn.query_start_loc[index].long()
        first = torch.tensor([firsts[b] for b in group], device=query.device)
        # Columns past a sequence's table are clamped to a valid index; the mask hides them.
        columns = (first[:, None] + torch.arange(num_blocks, device=query.device)).clamp_(max=width - 1)
        keys, values = _gather_context(kv_layer, attn.block_tables[index[:, None], columns], out_dim)
        pos = (first * block_size)[:, None] + torch.arange(num_blocks * block_size, device=query.device)
        mask = pos < lens[:, None]
        if sliding_window is not None:
            mask &= pos >= lens[:, None] - sliding_window
        result = _attend(query.index_select(0, tokens).unsqueeze(2), keys, values, mask[:, None, :], scale)
        out.index_copy_(0, tokens, result.squeeze(2))
