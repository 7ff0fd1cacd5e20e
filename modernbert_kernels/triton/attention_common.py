"""Pieces shared by the block-sparse attention forward and backward kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Softmax runs in base 2 (exp2 is one MUFU instruction); LSE is stored in natural log.
LOG2E = tl.constexpr(1.4426950408889634)
SUPPORTED_HEAD_DIMS = (32, 64, 128)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def tile_needs_mask(q_start, k_start, seq_len, window,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """False for tiles fully inside the sequence and the window: they skip the token mask."""
    # Query rows past the end are never stored (forward, dq) or carry lse = +inf (dk, dv), so
    # only the key side of the sequence bound needs masking.
    needs = k_start + BLOCK_N > seq_len
    if HAS_WINDOW:
        farthest = tl.maximum(q_start + BLOCK_M - 1 - k_start, k_start + BLOCK_N - 1 - q_start)
        needs = needs | (farthest > window)
    if HAS_KEY_MASK:
        needs = needs | True
    return needs


@triton.jit
def tile_mask(q_pos, k_pos, seq_len, window, KeyMaskRow,
              HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """Token-level visibility of a tile: sequence end, window, key padding.

    ``q_pos`` and ``k_pos`` are broadcastable 2-D positions ([M, 1] and [1, N], or transposed for
    the dK/dV kernel, which works on key-major tiles).
    """
    visible = (k_pos < seq_len) & (q_pos < seq_len)
    if HAS_WINDOW:
        distance = q_pos - k_pos
        visible = visible & (distance <= window) & (distance >= -window)
    if HAS_KEY_MASK:
        keep = tl.load(KeyMaskRow + k_pos, mask=k_pos < seq_len, other=0)
        visible = visible & (keep != 0)
    return visible


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def prune_block_configs(configs, named_args, **kwargs):
    """Keep the tile shapes that divide the layout block (a tile never straddles two blocks)."""
    layout_block = kwargs.get("LAYOUT_BLOCK", named_args.get("LAYOUT_BLOCK"))
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    fp32 = named_args["Q"].dtype == torch.float32
    kept = []
    for config in configs:
        bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if layout_block % bm or layout_block % bn:
            continue
        # fp32 tiles take twice the registers and shared memory of 16-bit ones; past 64x64 at
        # head_dim 128 they spill (see the compile check).
        if fp32 and head_dim == 128 and bm * bn > 64 * 64:
            continue
        kept.append(config)
    if not kept:  # layouts with 16-token blocks: one tile per block
        kept = [triton.Config({"BLOCK_M": layout_block, "BLOCK_N": layout_block}, num_warps=4, num_stages=2)]
    return kept
