"""Per-row symmetric int8 quantization, optionally fused with a bias-free LayerNorm and smoothing.

One program per row reads the row once: (LayerNorm) -> (x * smooth) -> amax -> scale -> round.
Every int8 linear of the encoder follows a LayerNorm or the GeGLU, so the normalized activations
never reach memory in fp16/bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import interpreting

INT8_MAX = tl.constexpr(127.0)


@triton.jit
def round_half_away(y):
    """Round to nearest, ties away from zero (the reference uses the same rule)."""
    return tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))


@triton.jit
def quantize_rows_kernel(
    X, Q, Scale, NormWeight, Smooth,
    num_cols, stride_x, stride_q, eps,
    BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_SMOOTH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    inside = cols < num_cols
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, 0) / num_cols
        centered = tl.where(inside, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / num_cols + eps)
        x = centered * rstd * tl.load(NormWeight + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(Smooth + cols, mask=inside, other=0.0)
    amax = tl.max(tl.abs(x), 0)
    # An all-zero row quantizes to zeros with scale 1: no division by zero, no NaN. A row holding
    # a NaN or an Inf (x * 0 is NaN there, whatever max does with NaN) gets scale NaN and zeros.
    finite = tl.sum(x * 0.0, 0) == 0.0
    scale = tl.where(finite, tl.where(amax > 0, amax / INT8_MAX, 1.0), float("nan"))
    q = round_half_away(x / scale)
    q = tl.where(finite, tl.minimum(tl.maximum(q, -INT8_MAX), INT8_MAX), 0.0)
    tl.store(Q + row * stride_q + cols, q.to(tl.int8), mask=inside)
    tl.store(Scale + row, scale)


def quantize_rows(x: torch.Tensor, norm_weight=None, eps: float = 1e-5, smooth=None):
    """x [M, K] (any float dtype, unit stride along K) -> (int8 [M, K], fp32 scales [M])."""
    rows, cols = x.shape
    q = torch.empty(rows, cols, device=x.device, dtype=torch.int8)
    scale = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0:
        return q, scale
    block_k = triton.next_power_of_2(cols)
    dummy = x.new_empty(0, dtype=torch.float32)
    quantize_rows_kernel[(rows,)](
        x, q, scale,
        dummy if norm_weight is None else norm_weight, dummy if smooth is None else smooth,
        cols, x.stride(0), q.stride(0), eps,
        BLOCK_K=block_k, HAS_NORM=norm_weight is not None, HAS_SMOOTH=smooth is not None,
        # One row per program: wide rows want more warps for the reductions.
        **({} if interpreting() else {"num_warps": 4 if block_k <= 2048 else 8}),
    )
    return q, scale
