"""Block-sparse attention forward: one program per (query tile, batch * head).

Each program walks the key blocks its query block visits (one CSR row of the layout) with an online
softmax in fp32 (log2 domain, so the exponentials are exp2) and writes the output and the
log-sum-exp that the backward pass needs.
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
def block_sparse_attention_fwd_kernel(
    Q, K, V, Out, Lse,
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
    q_ptrs = Q + batch64 * stride_qb + head64 * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0)
    K_base = K + batch64 * stride_kb + head64 * stride_kh + seq_start * stride_kt
    V_base = V + batch64 * stride_vb + head64 * stride_vh + seq_start * stride_vt
    KeyMaskRow = KeyMask + batch64 * stride_mb

    layout_row = RowOffsets + head * layout_head_stride + q_start // LAYOUT_BLOCK
    lo = tl.load(layout_row)
    hi = tl.load(layout_row + 1)
    hi = first_index_at_or_above(ColIndices, lo, hi, tl.cdiv(seq_len, LAYOUT_BLOCK))

    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        key_block = tl.load(ColIndices + t // SUB_TILES)
        k_start = key_block * LAYOUT_BLOCK + (t % SUB_TILES) * BLOCK_N
        offs_n = k_start + offs_n0
        in_seq = offs_n < seq_len
        k = tl.load(K_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        v = tl.load(V_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if tile_needs_mask(q_start, k_start, seq_len, window, BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_KEY_MASK):
            visible = tile_mask(offs_m[:, None], offs_n[None, :], seq_len, window, KeyMaskRow, HAS_WINDOW, HAS_KEY_MASK)
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

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = Out + batch64 * stride_ob + head64 * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < seq_len)
    # Natural-log LSE; +inf for rows with no visible key makes their backward probabilities 0.
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E, float("inf"))
    tl.store(Lse + batch64 * stride_lb + head64 * stride_lh + seq_start + offs_m, lse, mask=offs_m < seq_len)


# Tile shapes and pipelining depth are tuned per GPU at first call, among the candidates that
# attention_common.configs_for() lists for the layout block, head_dim and dtype.
block_sparse_attention_fwd_tuned = triton.autotune(
    configs=all_configs("fwd"),
    key=["LAYOUT_BLOCK", "HEAD_DIM", "IS_VARLEN", "HAS_WINDOW", "HAS_KEY_MASK"],
    prune_configs_by={"early_config_prune": pruner("fwd")},
)(block_sparse_attention_fwd_kernel)


def attention_forward(q, k, v, layout_tensors, layout_block, layout_heads, *, window, scale,
                      key_padding_mask, cu_seqlens, max_seqlen, tile=None):
    """Launch the forward kernel. Shapes were checked by the caller.

    q, k, v: [batch, heads, seq, head_dim] or [total_tokens, heads, head_dim] with cu_seqlens.
    Returns (out, lse) with lse [batch, heads, seq] or [heads, total_tokens], fp32, natural log.
    """
    row_offsets, col_indices = layout_tensors[:2]
    varlen = cu_seqlens is not None
    head_dim = q.shape[-1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if varlen:
        total, heads = q.shape[0], q.shape[1]
        batch = cu_seqlens.numel() - 1
        seq_len_padded = max_seqlen
        lse = torch.empty(heads, total, device=q.device, dtype=torch.float32)
        strides = [(0, t.stride(0), t.stride(1)) for t in (q, k, v, out)]
        lse_strides = (0, lse.stride(0))
    else:
        batch, heads, seq_len_padded = q.shape[0], q.shape[1], q.shape[2]
        lse = torch.empty(batch, heads, seq_len_padded, device=q.device, dtype=torch.float32)
        strides = [(t.stride(0), t.stride(2), t.stride(1)) for t in (q, k, v, out)]
        lse_strides = (lse.stride(0), lse.stride(1))
    has_key_mask = key_padding_mask is not None
    key_mask = key_padding_mask.to(torch.uint8).contiguous() if has_key_mask else q.new_empty(0, dtype=torch.uint8)
    cu = cu_seqlens if varlen else q.new_empty(0, dtype=torch.int32)
    layout_head_stride = 0 if layout_heads == 1 else row_offsets.shape[1]
    args = (
        q, k, v, out, lse, row_offsets, col_indices, cu, key_mask,
        *strides[0], *strides[1], *strides[2], *strides[3], *lse_strides,
        key_mask.stride(0) if has_key_mask else 0,
        layout_head_stride, heads, seq_len_padded, -1 if window is None else window, scale,
    )
    flags = dict(
        HEAD_DIM=head_dim, LAYOUT_BLOCK=layout_block, IS_VARLEN=varlen,
        HAS_WINDOW=window is not None, HAS_KEY_MASK=has_key_mask,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    if tile is None and autotuning():
        grid = lambda meta: (triton.cdiv(seq_len_padded, meta["BLOCK_M"]), batch * heads)
        block_sparse_attention_fwd_tuned[grid](*args, **flags)
    else:
        launch = tile or fixed_launch("fwd", layout_block, head_dim, q.dtype, q.device)
        grid = (triton.cdiv(seq_len_padded, launch["BLOCK_M"]), batch * heads)
        block_sparse_attention_fwd_kernel[grid](*args, **flags, **launch)
    return out, lse
