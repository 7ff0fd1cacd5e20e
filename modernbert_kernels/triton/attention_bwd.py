"""Block-sparse attention backward: two kernels, no atomics.

1. dq kernel, one program per query tile, walks the layout's rows. It also computes
   delta = rowsum(dO * O), which both kernels need, so no separate preprocessing pass reads dO and O.
2. dk/dv kernel, one program per key tile, walks the transposed layout (the query blocks that
   visit this key block), so every dK and dV row is owned by exactly one program.

Probabilities are recomputed from the forward's log-sum-exp: P = exp(scale * Q K^T - lse).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (
    LOG2E,
    AttentionLaunch,
    all_configs,
    layout_entries,
    load_rows,
    program_rows,
    pruner,
    sequence_base,
    sequence_offset,
    sub_tile_start,
    tile_mask,
    tile_needs_mask,
)


@triton.jit
def block_sparse_attention_bwd_dq_kernel(
    Q, K, V, Out, DOut, DQ, Lse, Delta,
    RowOffsets, ColIndices, CuSeqlens, KeyMask,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    stride_mb,
    layout_head_stride, num_heads, seq_len_padded, window, sm_scale,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch64, head, seq_start, seq_len, q_start = program_rows(CuSeqlens, num_heads, seq_len_padded, BLOCK_M,
                                                              IS_VARLEN)
    if q_start >= seq_len:
        return

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in_seq = offs_m < seq_len
    q = load_rows(sequence_base(Q, batch64, head, seq_start, stride_qb, stride_qh, stride_qt),
                  offs_m, stride_qt, offs_d, seq_len)
    # Out, DOut and DQ are contiguous tensors of q's shape: they share one set of strides.
    o_offsets = (sequence_offset(batch64, head, seq_start, stride_ob, stride_oh, stride_ot)
                 + offs_m[:, None] * stride_ot + offs_d[None, :])
    do = tl.load(DOut + o_offsets, mask=row_in_seq[:, None], other=0.0)
    o = tl.load(Out + o_offsets, mask=row_in_seq[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_offsets = sequence_offset(batch64, head, seq_start, stride_lb, stride_lh, 1) + offs_m
    tl.store(Delta + lse_offsets, delta, mask=row_in_seq)
    lse2 = tl.load(Lse + lse_offsets, mask=row_in_seq, other=float("inf")) * LOG2E

    K_base = sequence_base(K, batch64, head, seq_start, stride_kb, stride_kh, stride_kt)
    V_base = sequence_base(V, batch64, head, seq_start, stride_vb, stride_vh, stride_vt)
    KeyMaskRow = KeyMask + batch64 * stride_mb
    lo, hi = layout_entries(RowOffsets, ColIndices, head, layout_head_stride, q_start, seq_len, LAYOUT_BLOCK)

    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        k_start = sub_tile_start(ColIndices, t, LAYOUT_BLOCK, BLOCK_N)
        offs_n = k_start + offs_n0
        k = load_rows(K_base, offs_n, stride_kt, offs_d, seq_len)
        v = load_rows(V_base, offs_n, stride_vt, offs_d, seq_len)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if tile_needs_mask(q_start, k_start, seq_len, window, BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_KEY_MASK):
            visible = tile_mask(offs_m[:, None], offs_n[None, :], seq_len, window, KeyMaskRow,
                                HAS_WINDOW, HAS_KEY_MASK)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + o_offsets, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_in_seq[:, None])


@triton.jit
def block_sparse_attention_bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta,
    ColOffsets, RowIndices, CuSeqlens, KeyMask,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    stride_mb,
    layout_head_stride, num_heads, seq_len_padded, window, sm_scale,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch64, head, seq_start, seq_len, k_start = program_rows(CuSeqlens, num_heads, seq_len_padded, BLOCK_N,
                                                              IS_VARLEN)
    if k_start >= seq_len:
        return

    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = load_rows(sequence_base(K, batch64, head, seq_start, stride_kb, stride_kh, stride_kt),
                  offs_n, stride_kt, offs_d, seq_len)
    v = load_rows(sequence_base(V, batch64, head, seq_start, stride_vb, stride_vh, stride_vt),
                  offs_n, stride_vt, offs_d, seq_len)
    Q_base = sequence_base(Q, batch64, head, seq_start, stride_qb, stride_qh, stride_qt)
    DO_base = sequence_base(DOut, batch64, head, seq_start, stride_ob, stride_oh, stride_ot)
    Lse_base = sequence_base(Lse, batch64, head, seq_start, stride_lb, stride_lh, 1)
    Delta_base = sequence_base(Delta, batch64, head, seq_start, stride_lb, stride_lh, 1)
    KeyMaskRow = KeyMask + batch64 * stride_mb
    lo, hi = layout_entries(ColOffsets, RowIndices, head, layout_head_stride, k_start, seq_len, LAYOUT_BLOCK)

    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        q_start = sub_tile_start(RowIndices, t, LAYOUT_BLOCK, BLOCK_M)
        offs_m = q_start + offs_m0
        in_seq = offs_m < seq_len
        q = load_rows(Q_base, offs_m, stride_qt, offs_d, seq_len)
        do = load_rows(DO_base, offs_m, stride_ot, offs_d, seq_len)
        # Rows past the end load lse = +inf, so their probabilities are exactly 0.
        lse2 = tl.load(Lse_base + offs_m, mask=in_seq, other=float("inf")) * LOG2E
        delta = tl.load(Delta_base + offs_m, mask=in_seq, other=0.0)
        # Key-major tiles ([BLOCK_N, BLOCK_M]) so dK and dV accumulate without transposes.
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if tile_needs_mask(q_start, k_start, seq_len, window, BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_KEY_MASK):
            visible_t = tile_mask(offs_m[None, :], offs_n[:, None], seq_len, window, KeyMaskRow,
                                  HAS_WINDOW, HAS_KEY_MASK)
            p_t = tl.where(visible_t, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    grad_offsets = (sequence_offset(batch64, head, seq_start, stride_ob, stride_oh, stride_ot)
                    + offs_n[:, None] * stride_ot + offs_d[None, :])
    key_in_seq = offs_n < seq_len
    tl.store(DK + grad_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_in_seq[:, None])
    tl.store(DV + grad_offsets, dv.to(DV.dtype.element_ty), mask=key_in_seq[:, None])


_TUNE_KEY = ["LAYOUT_BLOCK", "HEAD_DIM", "IS_VARLEN", "HAS_WINDOW", "HAS_KEY_MASK"]
block_sparse_attention_bwd_dq_tuned = triton.autotune(
    configs=all_configs("dq"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": pruner("dq")},
)(block_sparse_attention_bwd_dq_kernel)
block_sparse_attention_bwd_dkdv_tuned = triton.autotune(
    configs=all_configs("dkdv"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": pruner("dkdv")},
)(block_sparse_attention_bwd_dkdv_kernel)


def attention_backward(dout, q, k, v, out, lse, layout_tensors, layout_block, layout_heads, *,
                       window, scale, key_padding_mask, cu_seqlens, max_seqlen, tile=None):
    """Launch the two backward kernels; returns (dq, dk, dv) as contiguous tensors of q's shape."""
    row_offsets, col_indices, col_offsets, row_indices = layout_tensors
    dout = dout.contiguous()
    out = out.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty_like(lse)
    launch = AttentionLaunch(q, k, v, dq, lse, layout_tensors, layout_block, layout_heads, window=window,
                             scale=scale, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                             max_seqlen=max_seqlen)
    launch.run("dq", block_sparse_attention_bwd_dq_kernel, block_sparse_attention_bwd_dq_tuned,
               (q, k, v, out, dout, dq, lse, delta, row_offsets, col_indices), "BLOCK_M", tile)
    launch.run("dkdv", block_sparse_attention_bwd_dkdv_kernel, block_sparse_attention_bwd_dkdv_tuned,
               (q, k, v, dout, dk, dv, lse, delta, col_offsets, row_indices), "BLOCK_N", tile)
    return dq, dk, dv
