"""Triton kernels behind `kvxfer.layers.triton_ops`: KV-cache store, paged decode with optional
context splits (and their log-sum-exp merge), and causal paged prefill for any batch mix.

Every kernel reads the paged cache through one layer's strides (`c_sb` block, `c_sh` head,
`c_ss` K/V slot, `c_sp` position in block; features contiguous). Scores are in the log2
domain (`qk_scale` includes log2(e)) so the online softmax uses exp2.

Integers that change from step to step or layer to layer (the block-table row stride, the
split length, the split count, the window) are `do_not_specialize`: Triton would otherwise
compile a variant per value class (1, a multiple of 16, other) and recompile inside timed runs.
"""

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    key_ptr, key_st, key_sh,
    value_ptr, value_st, value_sh,
    cache_ptr, c_sb, c_sh, c_ss, c_sp,
    slot_ptr, block_size, D,
    HAS_VALUE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (token, KV head): copy one head of one token's K (and V) into its cache slot."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dst = cache_ptr + (slot // block_size) * c_sb + head * c_sh + (slot % block_size) * c_sp + d
    k = tl.load(key_ptr + tok * key_st + head * key_sh + d, mask=dmask)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=dmask)
    if HAS_VALUE:
        v = tl.load(value_ptr + tok * value_st + head * value_sh + d, mask=dmask)
        tl.store(dst + c_ss, v.to(cache_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _attend_tile(
    q, qt, m_i, l_i, acc,
    kv_ptr, c_sh, c_ss, c_sp, c_sb, kv_head,
    bt_row_ptr, block_size, tok, valid, qk_scale,
    DV, DT,
    HAS_TAIL: tl.constexpr, SHARED_V: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One online-softmax step over the context tokens `tok` (`valid[M, N]` masks scores)."""
    tmask = tok >= 0
    page = tl.load(bt_row_ptr + tok // block_size, mask=tmask, other=0).to(tl.int64)
    row = kv_ptr + page * c_sb + kv_head * c_sh + (tok % block_size) * c_sp
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(row[:, None] + dv[None, :], mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if HAS_TAIL:
        dt = tl.arange(0, BLOCK_DT)
        kt = tl.load(row[:, None] + DV + dt[None, :], mask=tmask[:, None] & (dt[None, :] < DT), other=0.0)
        s += tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC)
    s = tl.where(valid, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing valid yet keep m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    if SHARED_V:
        v = k
    else:
        v = tl.load(row[:, None] + c_ss + dv[None, :], mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


# `window` in particular: Triton would make a window of 1 a constant; one compiled kernel
# serves every window, and its code is the one the sm_90 compile check sees.
@triton.jit(do_not_specialize=["bt_sb", "tokens_per_split", "window"])
def decode_kernel(
    q_ptr, q_st, q_sh,
    kv_ptr, c_sb, c_sh, c_ss, c_sp,
    bt_ptr, bt_sb, seq_lens_ptr, qsl_ptr,
    out_ptr, o_st, o_sh,
    part_ptr, lse_ptr,
    qk_scale, block_size, Hq, G, DV, DT, tokens_per_split, window,
    HAS_TAIL: tl.constexpr, SHARED_V: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (sequence, KV head x query-head tile, context split): one new token per sequence.

    With SPLIT, writes the split's normalised output and log2-sum-exp to `part`/`lse` for
    `merge_splits_kernel`; otherwise writes the output row directly. A `window` > 0 (sliding
    window) limits the context to its last `window` tokens; the splits cover only those.
    """
    seq = tl.program_id(0)
    g_tiles = tl.cdiv(G, BLOCK_G)
    kv_head = tl.program_id(1) // g_tiles
    g = (tl.program_id(1) % g_tiles) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = kv_head * G + g
    split = tl.program_id(2)
    q_tok = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) == q_tok:  # no new token for this sequence
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    start = first + split * tokens_per_split
    end = tl.minimum(seq_len, start + tokens_per_split)

    dv = tl.arange(0, BLOCK_DV)
    q_row = q_ptr + q_tok.to(tl.int64) * q_st + heads * q_sh
    q = tl.load(q_row[:, None] + dv[None, :], mask=gmask[:, None] & (dv[None, :] < DV), other=0.0)
    q = q.to(kv_ptr.dtype.element_ty)
    qt = q
    if HAS_TAIL:
        dt = tl.arange(0, BLOCK_DT)
        qt = tl.load(q_row[:, None] + DV + dt[None, :], mask=gmask[:, None] & (dt[None, :] < DT), other=0.0)
        qt = qt.to(kv_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * bt_sb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tok = tl.where(n < end, n, -1)
        valid = (tok >= 0)[None, :] & gmask[:, None]
        m_i, l_i, acc = _attend_tile(
            q, qt, m_i, l_i, acc, kv_ptr, c_sh, c_ss, c_sp, c_sb, kv_head, bt_row, block_size,
            tok, valid, qk_scale, DV, DT, HAS_TAIL, SHARED_V, BLOCK_DV, BLOCK_DT, DOT_PREC,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    omask = gmask[:, None] & (dv[None, :] < DV)
    if SPLIT:
        part_row = (seq.to(tl.int64) * Hq + heads) * tl.num_programs(2) + split
        tl.store(part_ptr + part_row[:, None] * BLOCK_DV + dv[None, :], out, mask=omask)
        tl.store(lse_ptr + part_row, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=gmask)
    else:
        o_row = out_ptr + q_tok.to(tl.int64) * o_st + heads * o_sh
        tl.store(o_row[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["n_splits"])
def merge_splits_kernel(
    part_ptr, lse_ptr, qsl_ptr, out_ptr, o_st, o_sh, Hq, n_splits, DV,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (sequence, query head): combine the context splits' outputs weighted by exp2(lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_tok = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) == q_tok:
        return
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    row = (seq.to(tl.int64) * Hq + head) * n_splits + s
    lse = tl.load(lse_ptr + row, mask=s < n_splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(part_ptr + row[:, None] * BLOCK_DV + dv[None, :], mask=(s < n_splits)[:, None] & (dv[None, :] < DV), other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + q_tok.to(tl.int64) * o_st + head * o_sh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


@triton.jit(do_not_specialize=["bt_sb", "window"])
def prefill_kernel(
    q_ptr, q_st, q_sh,
    kv_ptr, c_sb, c_sh, c_ss, c_sp,
    bt_ptr, bt_sb, seq_lens_ptr, qsl_ptr,
    out_ptr, o_st, o_sh,
    qk_scale, block_size, G, DV, DT, window,
    HAS_TAIL: tl.constexpr, SHARED_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (sequence, query tile, query head): causal attention of the sequence's new tokens.

    A `window` > 0 (sliding window) hides keys at or before `q_pos - window`; the loop starts at
    the tile holding the tile's earliest visible key.
    """
    seq = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    q_first = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_first
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    m = m_start + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    q_pos = seq_len - q_len + m  # causal offset: the new tokens are the sequence's last q_len
    kv_head = head // G

    dv = tl.arange(0, BLOCK_DV)
    q_row = q_ptr + (q_first + m).to(tl.int64) * q_st + head * q_sh
    q = tl.load(q_row[:, None] + dv[None, :], mask=mmask[:, None] & (dv[None, :] < DV), other=0.0)
    q = q.to(kv_ptr.dtype.element_ty)
    qt = q
    if HAS_TAIL:
        dt = tl.arange(0, BLOCK_DT)
        qt = tl.load(q_row[:, None] + DV + dt[None, :], mask=mmask[:, None] & (dt[None, :] < DT), other=0.0)
        qt = qt.to(kv_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * bt_sb
    end = tl.minimum(seq_len, seq_len - q_len + m_start + BLOCK_M)
    lo = tl.where(window > 0, tl.maximum(seq_len - q_len + m_start - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    for n0 in range(lo, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tok = tl.where(n < end, n, -1)
        valid = (tok >= 0)[None, :] & (tok[None, :] <= q_pos[:, None]) & mmask[:, None]
        valid &= (tok[None, :] > q_pos[:, None] - window) | (window == 0)
        m_i, l_i, acc = _attend_tile(
            q, qt, m_i, l_i, acc, kv_ptr, c_sh, c_ss, c_sp, c_sb, kv_head, bt_row, block_size,
            tok, valid, qk_scale, DV, DT, HAS_TAIL, SHARED_V, BLOCK_DV, BLOCK_DT, DOT_PREC,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_row = out_ptr + (q_first + m).to(tl.int64) * o_st + head * o_sh
    tl.store(o_row[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & (dv[None, :] < DV))
