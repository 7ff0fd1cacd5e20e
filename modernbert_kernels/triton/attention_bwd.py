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

from ..backends import autotuning
from .attention_common import (
    LOG2E,
    dot_precision,
    first_index_at_or_above,
    all_configs,
    fixed_launch,
    pruner,
    sequence_bounds,
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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    seq_start, seq_len = sequence_bounds(CuSeqlens, batch, seq_len_padded, IS_VARLEN)
    q_start = pid_m * BLOCK_M
    if q_start >= seq_len:
        return

    batch64 = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = seq_start + offs_m
    row_in_seq = offs_m < seq_len
    q = tl.load(Q + batch64 * stride_qb + head64 * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=row_in_seq[:, None], other=0.0)
    # Out, DOut and DQ are contiguous tensors of q's shape: they share one set of strides.
    o_offsets = batch64 * stride_ob + head64 * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    do = tl.load(DOut + o_offsets, mask=row_in_seq[:, None], other=0.0)
    o = tl.load(Out + o_offsets, mask=row_in_seq[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_offsets = batch64 * stride_lb + head64 * stride_lh + seq_start + offs_m
    tl.store(Delta + lse_offsets, delta, mask=row_in_seq)
    lse2 = tl.load(Lse + lse_offsets, mask=row_in_seq, other=float("inf")) * LOG2E

    K_base = K + batch64 * stride_kb + head64 * stride_kh + seq_start * stride_kt
    V_base = V + batch64 * stride_vb + head64 * stride_vh + seq_start * stride_vt
    KeyMaskRow = KeyMask + batch64 * stride_mb
    layout_row = RowOffsets + head * layout_head_stride + q_start // LAYOUT_BLOCK
    lo = tl.load(layout_row)
    hi = first_index_at_or_above(ColIndices, lo, tl.load(layout_row + 1), tl.cdiv(seq_len, LAYOUT_BLOCK))

    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        key_block = tl.load(ColIndices + t // SUB_TILES)
        k_start = key_block * LAYOUT_BLOCK + (t % SUB_TILES) * BLOCK_N
        offs_n = k_start + offs_n0
        in_seq = offs_n < seq_len
        k = tl.load(K_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        v = tl.load(V_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
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
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    seq_start, seq_len = sequence_bounds(CuSeqlens, batch, seq_len_padded, IS_VARLEN)
    k_start = pid_n * BLOCK_N
    if k_start >= seq_len:
        return

    batch64 = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = seq_start + offs_n
    key_in_seq = offs_n < seq_len
    k = tl.load(K + batch64 * stride_kb + head64 * stride_kh + keys[:, None] * stride_kt + offs_d[None, :],
                mask=key_in_seq[:, None], other=0.0)
    v = tl.load(V + batch64 * stride_vb + head64 * stride_vh + keys[:, None] * stride_vt + offs_d[None, :],
                mask=key_in_seq[:, None], other=0.0)
    Q_base = Q + batch64 * stride_qb + head64 * stride_qh + seq_start * stride_qt
    DO_base = DOut + batch64 * stride_ob + head64 * stride_oh + seq_start * stride_ot
    lse_base = batch64 * stride_lb + head64 * stride_lh + seq_start
    KeyMaskRow = KeyMask + batch64 * stride_mb
    layout_col = ColOffsets + head * layout_head_stride + k_start // LAYOUT_BLOCK
    lo = tl.load(layout_col)
    hi = first_index_at_or_above(RowIndices, lo, tl.load(layout_col + 1), tl.cdiv(seq_len, LAYOUT_BLOCK))

    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        query_block = tl.load(RowIndices + t // SUB_TILES)
        q_start = query_block * LAYOUT_BLOCK + (t % SUB_TILES) * BLOCK_M
        offs_m = q_start + offs_m0
        in_seq = offs_m < seq_len
        q = tl.load(Q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        do = tl.load(DO_base + offs_m[:, None] * stride_ot + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        # Rows past the end load lse = +inf, so their probabilities are exactly 0.
        lse2 = tl.load(Lse + lse_base + offs_m, mask=in_seq, other=float("inf")) * LOG2E
        delta = tl.load(Delta + lse_base + offs_m, mask=in_seq, other=0.0)
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
    grad_offsets = batch64 * stride_ob + head64 * stride_oh + keys[:, None] * stride_ot + offs_d[None, :]
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
    varlen = cu_seqlens is not None
    dout = dout.contiguous()
    out = out.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty_like(lse)
    if varlen:
        heads = q.shape[1]
        batch = cu_seqlens.numel() - 1
        seq_len_padded = max_seqlen
        strides = [(0, t.stride(0), t.stride(1)) for t in (q, k, v, dq)]
        lse_strides = (0, lse.stride(0))
    else:
        batch, heads, seq_len_padded = q.shape[0], q.shape[1], q.shape[2]
        strides = [(t.stride(0), t.stride(2), t.stride(1)) for t in (q, k, v, dq)]
        lse_strides = (lse.stride(0), lse.stride(1))
    has_key_mask = key_padding_mask is not None
    key_mask = key_padding_mask.to(torch.uint8).contiguous() if has_key_mask else q.new_empty(0, dtype=torch.uint8)
    cu = cu_seqlens if varlen else q.new_empty(0, dtype=torch.int32)
    layout_head_stride = 0 if layout_heads == 1 else row_offsets.shape[1]
    common = (
        *strides[0], *strides[1], *strides[2], *strides[3], *lse_strides,
        key_mask.stride(0) if has_key_mask else 0,
        layout_head_stride, heads, seq_len_padded, -1 if window is None else window, scale,
    )
    flags = dict(
        HEAD_DIM=q.shape[-1], LAYOUT_BLOCK=layout_block, IS_VARLEN=varlen,
        HAS_WINDOW=window is not None, HAS_KEY_MASK=has_key_mask,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    dq_args = (q, k, v, out, dout, dq, lse, delta, row_offsets, col_indices, cu, key_mask, *common)
    dkdv_args = (q, k, v, dout, dk, dv, lse, delta, col_offsets, row_indices, cu, key_mask, *common)
    if tile is None and autotuning():
        block_sparse_attention_bwd_dq_tuned[
            lambda meta: (triton.cdiv(seq_len_padded, meta["BLOCK_M"]), batch * heads)
        ](*dq_args, **flags)
        block_sparse_attention_bwd_dkdv_tuned[
            lambda meta: (triton.cdiv(seq_len_padded, meta["BLOCK_N"]), batch * heads)
        ](*dkdv_args, **flags)
    else:
        dq_launch = tile or fixed_launch("dq", layout_block, q.shape[-1], q.dtype, q.device)
        dkdv_launch = tile or fixed_launch("dkdv", layout_block, q.shape[-1], q.dtype, q.device)
        block_sparse_attention_bwd_dq_kernel[(triton.cdiv(seq_len_padded, dq_launch["BLOCK_M"]), batch * heads)](
            *dq_args, **flags, **dq_launch)
        block_sparse_attention_bwd_dkdv_kernel[(triton.cdiv(seq_len_padded, dkdv_launch["BLOCK_N"]), batch * heads)](
            *dkdv_args, **flags, **dkdv_launch)
    return dq, dk, dv
