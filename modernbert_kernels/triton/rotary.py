"""Rotary position embedding of rows (token, group) of [tokens, groups, head_dim].

One program turns BLOCK_ROWS rows: both halves of each row are loaded before either is stored,
and programs own disjoint rows, so the output may be the input itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import interpreting


@triton.jit
def rotary_kernel(
    X, Out, Cos, Sin,
    num_rows, groups, half,
    stride_xt, stride_xg, stride_ot, stride_og,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pairs = tl.arange(0, BLOCK_HALF)
    token, group = rows // groups, rows % groups
    inside = (rows < num_rows)[:, None] & (pairs < half)[None, :]
    x1_ptrs = X + (token * stride_xt + group * stride_xg)[:, None] + pairs[None, :]
    x1 = tl.load(x1_ptrs, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + half, mask=inside, other=0.0).to(tl.float32)
    angle_offsets = (token * half)[:, None] + pairs[None, :]
    cos = tl.load(Cos + angle_offsets, mask=inside, other=0.0)
    sin = tl.load(Sin + angle_offsets, mask=inside, other=0.0)
    out_ptrs = Out + (token * stride_ot + group * stride_og)[:, None] + pairs[None, :]
    tl.store(out_ptrs, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=inside)
    tl.store(out_ptrs + half, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=inside)


def rows_per_program(block_half: int) -> int:
    """1024 pairs per program (8 per thread at 4 warps): more spills at head_dim 128 (compile check)."""
    return max(1, min(64, 1024 // block_half))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """x, out [tokens, groups, head_dim] (unit stride along head_dim; out may be x), cos and sin
    contiguous fp32 [tokens, head_dim / 2]."""
    tokens, groups, head_dim = x.shape
    num_rows = tokens * groups
    if num_rows == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_rows = rows_per_program(block_half)
    rotary_kernel[(triton.cdiv(num_rows, block_rows),)](
        x, out, cos, sin, num_rows, groups, half,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_ROWS=block_rows, BLOCK_HALF=block_half,
        **({} if interpreting() else {"num_warps": 4}),
    )
