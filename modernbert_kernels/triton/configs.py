"""Launch configurations of every Triton kernel, kept one way: a table of candidate tiles per
kernel, the autotuner's candidate list and pruner built from it, and the fixed launch used without
autotuning (the GPU tests, the interpreter). `python -m modernbert_kernels.check` compiles every
candidate for sm_80 and sm_90; a candidate it finds spilling leaves the table.
"""

from __future__ import annotations

import itertools

import torch
import triton

from ..attention import SUPPORTED_HEAD_DIMS
from ..backends import interpreting


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
# head_dim 256 (Gemma 2 and 3) doubles every q, k, v and accumulator tile: the tables above spill or
# overflow shared memory there, so it has narrower tiles of its own, from a sweep of the tables
# above and of narrower shapes at head_dim 256 (benchmarks/NOTES.md, "head_dim 256").
_FP32_WIDE_TILES = {kernel: [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)] for kernel in ("fwd", "dq", "dkdv")}
_WIDE_TILES = {
    90: {
        "16bit": {
            "fwd": _staged([(64, 32, 8)]) + [(64, 64, 8, 2), (64, 16, 8, 2), (32, 32, 4, 3)],
            "dq": _staged([(64, 32, 8)]) + [(64, 64, 8, 2), (64, 16, 8, 2), (32, 32, 4, 3)],
            "dkdv": _staged([(32, 64, 8)]) + [(32, 32, 8, 3), (64, 16, 8, 2)],
        },
        "fp32": _FP32_WIDE_TILES,
    },
    80: {
        "16bit": {
            "fwd": _staged([(64, 32, 8)]) + [(64, 64, 8, 2), (64, 16, 8, 2), (32, 32, 4, 3)],
            "dq": _staged([(64, 32, 8)]) + [(32, 64, 8, 2), (64, 16, 8, 2), (32, 32, 4, 3)],
            "dkdv": _staged([(32, 32, 8)]) + [(32, 64, 8, 2), (64, 32, 8, 2), (32, 16, 8, 2)],
        },
        "fp32": _FP32_WIDE_TILES,
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
    # The band (window_left / window_right for causal masks, issue #21): Triton 3.6, 8 bytes
    (90, "fp32", "fwd", 32, 16, 32, 4, 2),
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
    # head_dim 256: Triton 3.8, then 3.6
    (90, "fp32", "dq", 256, 16, 32, 8, 2),
    (80, "fp32", "dq", 256, 32, 16, 8, 2),
    (80, "fp32", "dkdv", 256, 32, 16, 8, 2),
    (90, "fp32", "fwd", 256, 16, 32, 8, 2),
}
# Found spilling only with logit soft-capping (HAS_SOFTCAP: the tanh costs a few more registers per
# score, and dk/dv keeps its slope live across the dV product), excluded for the capped kernels only
# (benchmarks/NOTES.md, "Logit soft-capping in Triton").
_CAPPED_SPILLS = {
    # Triton 3.8 and 3.6
    (80, "16bit", "dq", 64, 64, 64, 8, 3),
    (90, "16bit", "dq", 128, 64, 64, 4, 2),
    (90, "16bit", "dq", 128, 64, 64, 4, 3),
    (90, "16bit", "dq", 256, 64, 64, 8, 2),
    (90, "fp32", "fwd", 128, 32, 16, 4, 2),
    (90, "fp32", "fwd", 128, 32, 32, 4, 1),
    # Triton 3.8
    (80, "fp32", "fwd", 64, 32, 16, 4, 2),
    # Triton 3.6
    (80, "16bit", "dkdv", 64, 32, 64, 8, 3),
    (80, "16bit", "fwd", 128, 64, 32, 8, 2),
    (90, "16bit", "dkdv", 128, 64, 64, 8, 3),
    (90, "16bit", "dkdv", 256, 32, 64, 8, 3),
    (90, "fp32", "dkdv", 64, 32, 16, 4, 2),
    # With tanh's series near 0 (the cap's precision fix): Triton 3.6, then 3.8
    (80, "16bit", "fwd", 32, 128, 64, 8, 2),
    (80, "16bit", "fwd", 32, 128, 64, 8, 3),
    (90, "16bit", "dkdv", 64, 64, 128, 8, 3),
    (90, "16bit", "dkdv", 128, 64, 64, 8, 2),
    (80, "fp32", "dkdv", 64, 16, 16, 4, 2),
    (80, "fp32", "dq", 64, 32, 16, 4, 2),
}


def arch_family(capability: int) -> int:
    """Tile tables exist for sm_80 (Ampere, Ada) and sm_90 (Hopper and newer)."""
    return 90 if capability >= 90 else 80


def configs_for(kernel: str, layout_block: int, head_dim: int, dtype: torch.dtype, arch: int = 90,
                capped: bool = False) -> list:
    """The autotuning candidates of ``kernel`` ("fwd", "dq", "dkdv") for one problem class
    (``capped``: with logit soft-capping).

    ``arch`` is the compute capability times ten. A tile never straddles two layout blocks, so its
    sides must divide the layout block; layouts with blocks smaller than every listed tile run one
    tile per block.
    """
    family = arch_family(arch)
    precision = "fp32" if dtype == torch.float32 else "16bit"
    tiles = (_WIDE_TILES if head_dim > 128 else _TILES)[family][precision][kernel]
    spills = _SPILLS | _CAPPED_SPILLS if capped else _SPILLS
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in tiles
        if layout_block % bm == 0 and layout_block % bn == 0
        and (family, precision, kernel, head_dim, bm, bn, warps, stages) not in spills
    ]
    if not configs:  # 16-token layout blocks: one tile per block
        configs = [triton.Config({"BLOCK_M": layout_block, "BLOCK_N": layout_block}, num_warps=4, num_stages=2)]
    return configs


def all_configs(kernel: str) -> list:
    """Every config configs_for() can return for ``kernel``: the autotuner's full list."""
    found = {}
    for arch, dtype, layout_block, head_dim, capped in itertools.product(
            _TILES, (torch.float16, torch.float32), (16, 32, 64, 128), SUPPORTED_HEAD_DIMS, (False, True)):
        for config in configs_for(kernel, layout_block, head_dim, dtype, arch, capped):
            found[str(config)] = config
    return list(found.values())


def pruner(kernel: str):
    """An autotuner early_config_prune hook that keeps configs_for()'s candidates for this GPU."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        wanted = configs_for(kernel, kwargs["LAYOUT_BLOCK"], kwargs["HEAD_DIM"], q.dtype, 10 * major + minor,
                             kwargs["HAS_SOFTCAP"])
        wanted = {str(c) for c in wanted}
        return [c for c in configs if str(c) in wanted]

    return prune


def _launch(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def fixed_launch(kernel: str, layout_block: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capped: bool) -> dict:
    """Launch parameters when not autotuning: small tiles in the interpreter; on a GPU the first
    candidate of configs_for() for its arch (spill-free per the compile check)."""
    if interpreting():
        return {"BLOCK_M": min(64, layout_block), "BLOCK_N": min(32, layout_block)}
    major, minor = torch.cuda.get_device_capability(device)
    return _launch(configs_for(kernel, layout_block, head_dim, dtype, 10 * major + minor, capped)[0])


# int8 GEMM candidates for A100/H100 int8 tensor cores, as (BLOCK_M, BLOCK_N, BLOCK_K, warps,
# stages). The fp32 epilogue (erf GELU) bounds the tile: 128x128 needs 8 warps, and 128x256 or
# 256x128 spill even with 8. BLOCK_K = 32 serves K that 64 does not divide; int8 MMAs need K >= 32
# per tile.
_INT8_TILES = [(128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               (64, 64, 128, 4, 3), (64, 64, 32, 4, 4)]
INT8_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in _INT8_TILES
]


def int8_candidates(k: int) -> list:
    """The int8 configs for a K: the main loop has no K mask, so BLOCK_K must divide K."""
    return [c for c in INT8_CONFIGS if k % c.kwargs["BLOCK_K"] == 0]


def int8_pruner(configs, named_args, **kwargs):
    """The autotuner's early_config_prune hook for the int8 GEMM."""
    return [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0]


def int8_fixed_launch(k: int) -> dict:
    """Without autotuning: small tiles in the interpreter, else the first candidate for K."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    return _launch(int8_candidates(k)[0])
