"""The forward pass of the block-sparse attention kernel (attention_kernel.py).

A program owns BLOCK_M query rows and walks the key blocks their layout row visits with an online
softmax in fp32 (log2 domain, so the exponentials are exp2) over the scaled, optionally soft-capped
scores; it writes the output and the log-sum-exp that the backward pass needs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import LOG2E, load_key_tile, load_rows, scaled_scores, tile_mask, tile_needs_mask


@triton.jit
def forward_rows(Q, K, V, Out, Lse, KeyMaskRow, Indices, lo, hi, q_start, seq_len, window_left, window_right, sm_scale,
                 softcap,
                 stride_qt, stride_kt, stride_vt, stride_ot,
                 HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Q, K, V, Out, Lse point at token 0 of the program's sequence; entries [lo, hi) of Indices
    are the key blocks to visit."""
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_rows(Q, offs_m, stride_qt, offs_d, seq_len)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        k_start, offs_n, k, v = load_key_tile(K, V, Indices, t, offs_n0, offs_d, stride_kt, stride_vt, seq_len,
                                              LAYOUT_BLOCK, BLOCK_N)
        qk, _ = scaled_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), sm_scale, softcap, HAS_SOFTCAP)
        if tile_needs_mask(q_start, k_start, seq_len, window_left, window_right, BLOCK_M, BLOCK_N, HAS_WINDOW,
                           HAS_KEY_MASK):
            visible = tile_mask(offs_m[:, None], offs_n[None, :], seq_len, window_left, window_right, KeyMaskRow,
                                HAS_WINDOW, HAS_KEY_MASK)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never produces NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # 0 for a row that saw no key; a NaN sum (a NaN score) makes the output and lse NaN.
    has_keys = l_i != 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    row_in_seq = offs_m < seq_len
    tl.store(Out + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_in_seq[:, None])
    # Natural-log LSE; +inf for rows with no visible key makes their backward probabilities 0.
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E, float("inf"))
    tl.store(Lse + offs_m, lse, mask=row_in_seq)
