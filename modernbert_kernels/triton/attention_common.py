"""Pieces shared by the block-sparse attention forward and backward kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention import SUPPORTED_HEAD_DIMS
from ..backends import interpreting

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


# Tile candidates per arch family, kernel and precision, as (BLOCK_M, BLOCK_N, num_warps, stages).
# They come from register/spill sweeps of every tile shape for sm_80 and sm_90 (benchmarks/NOTES.md,
# "compile sweep"); the compile check re-verifies each one. fp32 uses exact (IEEE) dots, which run
# on FMA units with both operands in registers, so its tiles are much smaller and ptxas's register
# allocation is erratic: only the measured-clean shapes are listed.
def _staged(tiles, stages=(2, 3)):
    return [(bm, bn, warps, s) for bm, bn, warps in tiles for s in stages]


_FP32_TILES = {
    "fwd": [(32, 32, 4, 1), (16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)],
    "dq": [(16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)],
    "dkdv": [(32, 16, 4, 2), (16, 16, 4, 2), (32, 32, 4, 1)],
}
_TILES = {
    90: {
        "16bit": {
            "fwd": _staged([(64, 32, 4), (64, 32, 8), (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8)])
            + [(32, 32, 4, 3)],
            "dq": _staged([(64, 32, 4), (64, 32, 8), (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8)])
            + [(32, 32, 4, 3)],
            # dk/dv holds a BLOCK_N key tile and two accumulators while it walks BLOCK_M query tiles.
            "dkdv": _staged([(32, 64, 8), (32, 128, 8), (64, 64, 8), (64, 128, 8)]) + [(32, 32, 8, 3)],
        },
        "fp32": _FP32_TILES,
    },
    80: {
        "16bit": {
            "fwd": _staged([(64, 32, 4), (64, 32, 8), (64, 64, 8), (128, 32, 8), (128, 64, 8)]) + [(32, 32, 4, 3)],
            "dq": _staged([(64, 32, 4), (64, 32, 8), (32, 64, 4), (32, 64, 8)]) + [(64, 64, 8, 3), (32, 32, 4, 3)],
            "dkdv": _staged([(32, 32, 8), (32, 64, 8), (64, 32, 8)]) + [(32, 16, 8, 2)],
        },
        "fp32": _FP32_TILES,
    },
}
# (arch family, precision, kernel, head_dim, BLOCK_M, BLOCK_N, warps, stages) that the compile
# check found spilling at some layout block, under Triton 3.8 or 3.6 (the GPU machines' version:
# ptxas sees different code from each); excluded at every layout block and every Triton version,
# so one table is clean on both (benchmarks/NOTES.md, "Two Triton versions").
_SPILLS = {
    # The three passes as one kernel (issue #12): Triton 3.8, then 3.6
    (90, "fp32", "fwd", 64, 32, 16, 4, 2),
    (90, "16bit", "dkdv", 128, 32, 32, 8, 3),
    (80, "fp32", "fwd", 32, 32, 32, 4, 1),
    (80, "fp32", "dkdv", 32, 32, 16, 4, 2),
    (80, "16bit", "dkdv", 128, 32, 32, 8, 3),
    (90, "fp32", "fwd", 64, 16, 32, 4, 2),
    (90, "fp32", "dq", 32, 32, 16, 4, 2),
    (80, "fp32", "dq", 128, 32, 16, 4, 2),
    (80, "fp32", "dkdv", 128, 32, 32, 4, 1),
    (80, "16bit", "dkdv", 128, 32, 32, 8, 2),
    # Triton 3.8
    (90, "16bit", "dkdv", 128, 64, 128, 8, 2),
    (90, "16bit", "dkdv", 128, 64, 128, 8, 3),
    (90, "fp32", "dkdv", 128, 32, 32, 4, 1),
    (80, "fp32", "fwd", 64, 32, 32, 4, 1),
    (80, "fp32", "fwd", 128, 16, 32, 4, 2),
    (80, "fp32", "dkdv", 128, 16, 16, 4, 2),
    # Triton 3.6
    (90, "fp32", "fwd", 64, 32, 32, 4, 1),
    (90, "fp32", "fwd", 128, 16, 32, 4, 2),
    (90, "fp32", "dkdv", 64, 32, 32, 4, 1),
    (90, "fp32", "dkdv", 128, 32, 16, 4, 2),
    (80, "16bit", "fwd", 128, 64, 32, 8, 3),
    (80, "16bit", "dkdv", 32, 64, 32, 8, 2),
    (80, "16bit", "dkdv", 32, 64, 32, 8, 3),
    (80, "16bit", "dkdv", 128, 64, 32, 8, 2),
    (80, "fp32", "dq", 128, 16, 32, 4, 2),
    (80, "fp32", "dkdv", 32, 32, 32, 4, 1),
    (80, "fp32", "dkdv", 64, 32, 32, 4, 1),
}


def arch_family(capability: int) -> int:
    """Tile tables exist for sm_80 (Ampere, Ada) and sm_90 (Hopper and newer)."""
    return 90 if capability >= 90 else 80


def configs_for(kernel: str, layout_block: int, head_dim: int, dtype: torch.dtype, arch: int = 90) -> list:
    """The autotuning candidates of ``kernel`` ("fwd", "dq", "dkdv") for one problem class.

    ``arch`` is the compute capability times ten. A tile never straddles two layout blocks, so its
    sides must divide the layout block; layouts with blocks smaller than every listed tile run one
    tile per block.
    """
    family = arch_family(arch)
    precision = "fp32" if dtype == torch.float32 else "16bit"
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in _TILES[family][precision][kernel]
        if layout_block % bm == 0 and layout_block % bn == 0
        and (family, precision, kernel, head_dim, bm, bn, warps, stages) not in _SPILLS
    ]
    if not configs:  # 16-token layout blocks: one tile per block
        configs = [triton.Config({"BLOCK_M": layout_block, "BLOCK_N": layout_block}, num_warps=4, num_stages=2)]
    return configs


def all_configs(kernel: str) -> list:
    """Every config configs_for() can return for ``kernel``: the autotuner's full list."""
    found = {}
    for arch in _TILES:
        for dtype in (torch.float16, torch.float32):
            for layout_block in (16, 32, 64, 128):
                for head_dim in SUPPORTED_HEAD_DIMS:
                    for config in configs_for(kernel, layout_block, head_dim, dtype, arch):
                        found[str(config)] = config
    return list(found.values())


def pruner(kernel: str):
    """An autotuner early_config_prune hook that keeps configs_for()'s candidates for this GPU."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        wanted = configs_for(kernel, kwargs["LAYOUT_BLOCK"], kwargs["HEAD_DIM"], q.dtype, 10 * major + minor)
        wanted = {str(c) for c in wanted}
        return [c for c in configs if str(c) in wanted]

    return prune


def fixed_launch(kernel: str, layout_block: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch parameters when not autotuning: small tiles in the interpreter; on a GPU the first
    candidate of configs_for() for its arch (spill-free per the compile check)."""
    if interpreting():
        return {"BLOCK_M": min(64, layout_block), "BLOCK_N": min(32, layout_block)}
    major, minor = torch.cuda.get_device_capability(device)
    config = configs_for(kernel, layout_block, head_dim, dtype, 10 * major + minor)[0]
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}

