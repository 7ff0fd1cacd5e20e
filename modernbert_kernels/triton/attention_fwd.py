"""Block-sparse attention forward: one program per (query tile, batch * head).

Each program walks the key blocks its query block visits (one CSR row of the layout) with an online
softmax in fp32 (log2 domain, so the exponentials are exp2) and writes the output and the
log-sum-exp that the backward pass needs.
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
    sub_tile_start,
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
    batch64, head, seq_start, seq_len, q_start = program_rows(CuSeqlens, num_heads, seq_len_padded, BLOCK_M,
                                                              IS_VARLEN)
    if q_start >= seq_len:
        return

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_rows(sequence_base(Q, batch64, head, seq_start, stride_qb, stride_qh, stride_qt),
                  offs_m, stride_qt, offs_d, seq_len)
    K_base = sequence_base(K, batch64, head, seq_start, stride_kb, stride_kh, stride_kt)
    V_base = sequence_base(V, batch64, head, seq_start, stride_vb, stride_vh, stride_vt)
    KeyMaskRow = KeyMask + batch64 * stride_mb
    lo, hi = layout_entries(RowOffsets, ColIndices, head, layout_head_stride, q_start, seq_len, LAYOUT_BLOCK)

    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for t in range(lo * SUB_TILES, hi * SUB_TILES):
        k_start = sub_tile_start(ColIndices, t, LAYOUT_BLOCK, BLOCK_N)
        offs_n = k_start + offs_n0
        k = load_rows(K_base, offs_n, stride_kt, offs_d, seq_len)
        v = load_rows(V_base, offs_n, stride_vt, offs_d, seq_len)
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
    O_base = sequence_base(Out, batch64, head, seq_start, stride_ob, stride_oh, stride_ot)
    tl.store(O_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < seq_len)
    # Natural-log LSE; +inf for rows with no visible key makes their backward probabilities 0.
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E, float("inf"))
    tl.store(sequence_base(Lse, batch64, head, seq_start, stride_lb, stride_lh, 1) + offs_m, lse, mask=offs_m < seq_len)


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
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if cu_seqlens is not None:
        lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
    else:
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    launch = AttentionLaunch(q, k, v, out, lse, layout_tensors, layout_block, layout_heads, window=window,
                             scale=scale, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                             max_seqlen=max_seqlen)
    launch.run("fwd", block_sparse_attention_fwd_kernel, block_sparse_attention_fwd_tuned,
               (q, k, v, out, lse, *layout_tensors[:2]), "BLOCK_M", tile)
    return out, lse
