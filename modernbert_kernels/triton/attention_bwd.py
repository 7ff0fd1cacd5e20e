"""The backward passes of the block-sparse attention kernel (attention_kernel.py), no atomics.

1. dq: a program owns BLOCK_M query rows and walks their layout row. It also computes
   delta = rowsum(dO * O), which both passes need, so no separate preprocessing pass reads dO and O.
2. dk/dv: a program owns BLOCK_N key rows and walks the transposed layout (the query blocks that
   visit its key block), so every dK and dV row is owned by exactly one program.

Probabilities are recomputed from the forward's log-sum-exp: P = exp(S - lse) with S = scale * Q K^T,
or softcap * tanh(scale * Q K^T / softcap) with a cap, whose slope 1 - tanh^2 multiplies dS.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import (LOG2E, load_key_tile, load_rows, scaled_scores, sub_tile_start, tile_mask,
                               tile_needs_mask)


@triton.jit
def dq_rows(Q, K, V, Out, DOut, DQ, Lse, Delta, KeyMaskRow, Indices, lo, hi, q_start, seq_len, window_left,
            window_right, sm_scale, softcap,
            stride_qt, stride_kt, stride_vt, stride_ot,
            HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Pointers at token 0 of the program's sequence; Out, DOut and DQ are contiguous tensors of
    q's shape and share stride_ot. Entries [lo, hi) of Indices are the key blocks to visit."""
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in_seq = offs_m < seq_len
    q = load_rows(Q, offs_m, stride_qt, offs_d, seq_len)
    do = load_rows(DOut, offs_m, stride_ot, offs_d, seq_len)
    o = load_rows(Out, offs_m, stride_ot, offs_d, seq_len)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + offs_m, delta, mask=row_in_seq)
    lse2 = tl.load(Lse + offs_m, mask=row_in_seq, other=float("inf")) * LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        k_start, offs_n, k, v = load_key_tile(K, V, Indices, t, offs_n0, offs_d, stride_kt, stride_vt, seq_len,
                                              LAYOUT_BLOCK, BLOCK_N)
        scores, slope = scaled_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), sm_scale, softcap,
                                      HAS_SOFTCAP)
        p = tl.math.exp2(scores - lse2[:, None])
        if tile_needs_mask(q_start, k_start, seq_len, window_left, window_right, BLOCK_M, BLOCK_N, HAS_WINDOW,
                           HAS_KEY_MASK):
            visible = tile_mask(offs_m[:, None], offs_n[None, :], seq_len, window_left, window_right, KeyMaskRow,
                                HAS_WINDOW, HAS_KEY_MASK)
            p = tl.where(visible, p, 0.0)
        if HAS_SOFTCAP:
            p = p * slope  # dq needs P only through dS: fold the slope in now, so it is not live across the dot
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + offs_m[:, None] * stride_ot + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_in_seq[:, None])


@triton.jit
def dkdv_rows(Q, K, V, DOut, DK, DV, Lse, Delta, KeyMaskRow, Indices, lo, hi, k_start, seq_len, window_left,
              window_right, sm_scale, softcap,
              stride_qt, stride_kt, stride_vt, stride_ot,
              HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Pointers at token 0 of the program's sequence; DOut, DK and DV share stride_ot. Entries
    [lo, hi) of Indices (the transposed layout) are the query blocks that visit this key block."""
    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = load_rows(K, offs_n, stride_kt, offs_d, seq_len)
    v = load_rows(V, offs_n, stride_vt, offs_d, seq_len)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        q_start = sub_tile_start(Indices, t, LAYOUT_BLOCK, BLOCK_M)
        offs_m = q_start + offs_m0
        in_seq = offs_m < seq_len
        q = load_rows(Q, offs_m, stride_qt, offs_d, seq_len)
        do = load_rows(DOut, offs_m, stride_ot, offs_d, seq_len)
        # Rows past the end load lse = +inf, so their probabilities are exactly 0.
        lse2 = tl.load(Lse + offs_m, mask=in_seq, other=float("inf")) * LOG2E
        delta = tl.load(Delta + offs_m, mask=in_seq, other=0.0)
        # Key-major tiles ([BLOCK_N, BLOCK_M]) so dK and dV accumulate without transposes.
        scores_t, slope_t = scaled_scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), sm_scale, softcap,
                                          HAS_SOFTCAP)
        p_t = tl.math.exp2(scores_t - lse2[None, :])
        if tile_needs_mask(q_start, k_start, seq_len, window_left, window_right, BLOCK_M, BLOCK_N, HAS_WINDOW,
                           HAS_KEY_MASK):
            visible_t = tile_mask(offs_m[None, :], offs_n[:, None], seq_len, window_left, window_right, KeyMaskRow,
                                  HAS_WINDOW, HAS_KEY_MASK)
            p_t = tl.where(visible_t, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            p_t = p_t * slope_t  # the rest needs P only through dS (as in dq)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    grad_offsets = offs_n[:, None] * stride_ot + offs_d[None, :]
    key_in_seq = offs_n < seq_len
    tl.store(DK + grad_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_in_seq[:, None])
    tl.store(DV + grad_offsets, dv.to(DV.dtype.element_ty), mask=key_in_seq[:, None])
