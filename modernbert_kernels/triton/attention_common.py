"""Pieces shared by the passes of the block-sparse attention kernel: program rows, sequence
pointers, the layout walk, tile masks. Their launch configurations are in configs.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Softmax runs in base 2 (exp2 is one MUFU instruction); LSE is stored in natural log.
LOG2E = tl.constexpr(1.4426950408889634)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs default to TF32 on tensor cores (10-bit mantissa); fp32 users asked for fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def sequence_bounds(CuSeqlens, batch, seq_len_padded, IS_VARLEN: tl.constexpr):
    """(first token of the sequence in the token axis, its length)."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + batch)
        length = tl.load(CuSeqlens + batch + 1) - start
    else:
        start = batch * 0
        length = seq_len_padded + batch * 0
    return start.to(tl.int64), length


@triton.jit
def program_rows(CuSeqlens, num_heads, seq_len_padded, BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """This program's batch (int64), head, sequence (start, length) and first row: the rows are
    axis-0 tiles of BLOCK tokens (queries, or keys for dk/dv), axis 1 is batch * heads."""
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    seq_start, seq_len = sequence_bounds(CuSeqlens, batch, seq_len_padded, IS_VARLEN)
    return batch.to(tl.int64), pid_bh % num_heads, seq_start, seq_len, tl.program_id(0) * BLOCK


@triton.jit
def sequence_offset(batch64, head, seq_start, stride_b, stride_h, stride_t):
    """Element offset of token 0 of this (batch, head)'s sequence in a tensor with these strides."""
    return batch64 * stride_b + head.to(tl.int64) * stride_h + seq_start * stride_t


@triton.jit
def sequence_base(X, batch64, head, seq_start, stride_b, stride_h, stride_t):
    """Pointer to token 0 of this (batch, head)'s sequence in X."""
    return X + sequence_offset(batch64, head, seq_start, stride_b, stride_h, stride_t)


@triton.jit
def load_rows(Base, positions, stride_t, offs_d, seq_len):
    """Rows ``positions`` of the sequence at Base as a [len(positions), HEAD_DIM] tile, zeros
    past its end."""
    return tl.load(Base + positions[:, None] * stride_t + offs_d[None, :],
                   mask=(positions < seq_len)[:, None], other=0.0)


@triton.jit
def layout_entries(Offsets, Indices, head, layout_head_stride, start, seq_len, LAYOUT_BLOCK: tl.constexpr):
    """[lo, hi): the entries of the layout row (or transposed row) of the block holding token
    ``start``, cut to the blocks inside the sequence."""
    row = Offsets + head * layout_head_stride + start // LAYOUT_BLOCK
    lo = tl.load(row)
    return lo, first_index_at_or_above(Indices, lo, tl.load(row + 1), tl.cdiv(seq_len, LAYOUT_BLOCK))


@triton.jit
def sub_tile_start(Indices, t, LAYOUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """First token of sub-tile t of the walk: entry t // (LAYOUT_BLOCK // BLOCK) of Indices names
    the layout block, t % (LAYOUT_BLOCK // BLOCK) the BLOCK-token tile inside it."""
    SUB_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK
    return tl.load(Indices + t // SUB_TILES) * LAYOUT_BLOCK + (t % SUB_TILES) * BLOCK


@triton.jit
def load_key_tile(K, V, Indices, t, offs_n0, offs_d, stride_kt, stride_vt, seq_len,
                  LAYOUT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sub-tile t of a layout row's walk over key blocks: (first key, key positions, k, v)."""
    k_start = sub_tile_start(Indices, t, LAYOUT_BLOCK, BLOCK_N)
    offs_n = k_start + offs_n0
    k = load_rows(K, offs_n, stride_kt, offs_d, seq_len)
    return k_start, offs_n, k, load_rows(V, offs_n, stride_vt, offs_d, seq_len)


@triton.jit
def first_index_at_or_above(Indices, lo, hi, limit):
    """Binary search in the sorted ``Indices[lo:hi]``: the first position whose value is >= limit.

    A layout built for the longest sequence lists key blocks that a shorter sequence does not
    have; cutting the row here skips them instead of computing fully masked tiles.
    """
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(Indices + mid) < limit
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def scaled_scores(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(scores in log2 units, their slope against scale * qk): scale * qk with slope 1, or with
    the cap softcap * tanh(scale * qk / softcap), whose slope is 1 - tanh^2 (the backward's)."""
    if HAS_SOFTCAP:
        # tanh(x) = 1 - r with r = 2 / (e^2x + 1): one exp2, and no libdevice, which the
        # interpreter lacks. r gives the slope r (2 - r) without cancelling near tanh = 1; e^2x
        # overflowing to inf gives tanh 1, slope 0, and a NaN score stays NaN. Near x = 0, 1 - r
        # cancels (an absolute error of ~6e-8, which the cap multiplies: scores far below a large
        # cap would lose their digits), so there the odd series to x^7 (below 2e-9 relative).
        x = qk * (sm_scale / softcap)
        r = 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        near_zero = tl.abs(x) < 0.125
        tanh = tl.where(near_zero, series, 1.0 - r)
        return tanh * (softcap * LOG2E), tl.where(near_zero, 1.0 - series * series, r * (2.0 - r))
    else:
        return qk * (sm_scale * LOG2E), 1.0


# The band's unbounded side, as the kernels take it: farther than any sequence reaches.
UNBOUNDED = 1 << 30


@triton.jit
def tile_needs_mask(q_start, k_start, seq_len, window_left, window_right,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """False for tiles fully inside the sequence and the band (window, causal): they skip the
    token mask."""
    # Query rows past the end are never stored (forward, dq) or carry lse = +inf (dk, dv), so
    # only the key side of the sequence bound needs masking.
    needs = k_start + BLOCK_N > seq_len
    if HAS_WINDOW:
        farthest_back = q_start + BLOCK_M - 1 - k_start  # the largest query - key in the tile
        farthest_ahead = k_start + BLOCK_N - 1 - q_start  # the largest key - query
        needs = needs | (farthest_back > window_left) | (farthest_ahead > window_right)
    if HAS_KEY_MASK:
        needs = needs | True
    return needs


@triton.jit
def tile_mask(q_pos, k_pos, seq_len, window_left, window_right, KeyMaskRow,
              HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """Token-level visibility of a tile: sequence end, band (-window_right <= query - key <=
    window_left: a window, causal, or both), key padding.

    ``q_pos`` and ``k_pos`` are broadcastable 2-D positions ([M, 1] and [1, N], or transposed for
    the dK/dV kernel, which works on key-major tiles).
    """
    visible = (k_pos < seq_len) & (q_pos < seq_len)
    if HAS_WINDOW:
        distance = q_pos - k_pos
        visible = visible & (distance <= window_left) & (distance >= -window_right)
    if HAS_KEY_MASK:
        keep = tl.load(KeyMaskRow + k_pos, mask=k_pos < seq_len, other=0)
        visible = visible & (keep != 0)
    return visible
