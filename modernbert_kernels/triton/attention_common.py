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


# Tile shapes per kernel, from a register/spill sweep of every (BLOCK_M, BLOCK_N, warps) over
# head_dim 32/64/128 on sm_90 (benchmarks/NOTES.md, "compile sweep"); the compile check re-verifies
# each one for sm_80 and sm_90. Entries are (BLOCK_M, BLOCK_N, num_warps). fp32 uses exact (IEEE)
# dots, which run on FMA units with operands in registers, so its tiles are much smaller.
_TILES_16BIT = {
    "fwd": [(64, 32, 4), (64, 32, 8), (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8)],
    "dq": [(64, 32, 4), (64, 32, 8), (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8)],
    # dk/dv holds a BLOCK_N key tile and two accumulators while it walks BLOCK_M query tiles.
    "dkdv": [(32, 64, 8), (32, 128, 8), (64, 64, 8), (64, 128, 8)],
}
_TILES_FP32 = {
    "fwd": [(32, 32, 4), (32, 32, 8), (64, 32, 8)],
    "dq": [(32, 32, 4), (32, 32, 8), (64, 32, 8)],
    "dkdv": [(32, 32, 8)],
}
# Pairs that spill at head_dim 128 in the sweep: (kernel, BLOCK_M, BLOCK_N).
_SPILL_AT_HEAD_DIM_128 = {("dkdv", 64, 128)}
_STAGES = (2, 3)


def configs_for(kernel: str, layout_block: int, head_dim: int, dtype: torch.dtype) -> list:
    """The autotuning candidates of ``kernel`` ("fwd", "dq", "dkdv") for one problem class.

    A tile never straddles two layout blocks, so its sides must divide the layout block; layouts
    with blocks smaller than every listed tile run one tile per block.
    """
    tiles = (_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)[kernel]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps in tiles
        for stages in _STAGES
        if layout_block % bm == 0 and layout_block % bn == 0
        and not (head_dim == 128 and (kernel, bm, bn) in _SPILL_AT_HEAD_DIM_128)
    ]
    if not configs:
        tile = min(layout_block, 32)
        configs = [triton.Config({"BLOCK_M": tile, "BLOCK_N": tile}, num_warps=4, num_stages=2)]
    return configs


def all_configs(kernel: str) -> list:
    """Every config configs_for() can return for ``kernel``: the autotuner's full list."""
    found = {}
    for dtype in (torch.float16, torch.float32):
        for layout_block in (16, 32, 64, 128):
            for head_dim in SUPPORTED_HEAD_DIMS:
                for config in configs_for(kernel, layout_block, head_dim, dtype):
                    found[str(config)] = config
    return list(found.values())


def pruner(kernel: str):
    """An autotuner early_config_prune hook that keeps configs_for()'s candidates."""

    def prune(configs, named_args, **kwargs):
        wanted = {str(c) for c in configs_for(kernel, kwargs["LAYOUT_BLOCK"], kwargs["HEAD_DIM"], named_args["Q"].dtype)}
        return [c for c in configs if str(c) in wanted]

    return prune
