"""What the GPU suite compiles: the smoke cases and the wide test matrix, as data.

tests/test_gpu_smoke.py and the gpu tests of tests/test_attention.py and test_rotary.py parametrize
over these tables, and
``benchmarks/gpu_suite.sh --plan`` counts the distinct Triton specializations each stage compiles
from the same tables, so the plan cannot drift from what runs. A specialization is one kernel
compiled for one set of constexprs: with MODERNBERT_KERNELS_AUTOTUNE=0 (the GPU tests) that is one
compile each, on a cold cache.
"""

from __future__ import annotations

import dataclasses
import itertools

DTYPES = ("bf16", "fp16", "fp32")


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    dtype: str
    head_dim: int
    layout_block: int
    window: bool
    varlen: bool  # False: a padded batch with a key padding mask
    softcap: bool = False  # logit soft-capping (HAS_SOFTCAP)

    def specializations(self) -> set:
        # The forward and both backward kernels; the launch's constexprs decide the compile.
        flags = (self.dtype, self.head_dim, self.layout_block, self.window, self.varlen, not self.varlen, self.softcap)
        return {(kernel, *flags) for kernel in ("attention_fwd", "attention_dq", "attention_dkdv")}


@dataclasses.dataclass(frozen=True)
class Int8Case:
    out_dtype: str
    activation: str | None
    features: int  # K of the GEMM, the width of the fused quantize

    def specializations(self) -> set:
        # The activations are quantized with a fused LayerNorm (HAS_NORM) in a next-power-of-2 block.
        block_k = 1 << (self.features - 1).bit_length()
        return {("int8_matmul", self.out_dtype, self.activation, True),
                ("quantize_rows", self.out_dtype, block_k, True, False)}


@dataclasses.dataclass(frozen=True)
class RotaryCase:
    dtype: str
    head_dim: int

    def specializations(self) -> set:
        return {("rotary", self.dtype, _next_power_of_2(self.head_dim // 2))}


# (a) one case per kernel and dtype: ModernBERT's local layer (window 64, 64-token blocks, varlen).
SMOKE_ATTENTION = [AttentionCase(dtype, 64, 64, True, True) for dtype in DTYPES]
SMOKE_INT8 = [Int8Case(out_dtype, "geglu", 768) for out_dtype in ("bf16", "fp16")]
SMOKE_ROTARY = [RotaryCase(dtype, 64) for dtype in DTYPES]

# (a) also: the encoder (bf16, ModernBERT-base widths, 2 layers: one global, one local) captured in
# a CUDA graph (tests/test_encoder_gpu.py): its attention forwards and RoPE.
ENCODER_GRAPH_ATTENTION = [AttentionCase("bf16", 64, 64, window, True) for window in (False, True)]


def encoder_graph_specializations() -> set:
    forwards = {s for case in ENCODER_GRAPH_ATTENTION for s in case.specializations() if s[0] == "attention_fwd"}
    return forwards | RotaryCase("bf16", 64).specializations() | Int8Case("bf16", "geglu", 768).specializations()


# (c) the wide matrix of the gpu tests in tests/test_attention.py: layout name -> layout block.
MATRIX_LAYOUT_BLOCKS = {
    "sliding_window_64": 64, "sliding_window_128": 128, "bigbird_per_head": 64, "global_tokens": 64, "fixed_32": 32,
}
MATRIX_HEAD_DIMS = (32, 64, 128)
MATRIX_WINDOWS = (None, 64)
MATRIX_MODES = ("padded", "varlen")
MATRIX_ROTARY = [(1000, 12, 64), (77, 4, 128), (5, 3, 40)]
# head_dim 256 (Gemma 2 and 3) has tile tables of its own: Gemma 3's sliding layer, both batch modes.
WIDE_HEAD_ATTENTION = [AttentionCase(dtype, 256, 64, True, varlen) for varlen in (False, True) for dtype in DTYPES]
# Logit soft-capping (Gemma 2's) over a causal window: capped kernels are specializations of their own.
CAPPED_ATTENTION = [AttentionCase(dtype, 64, 64, True, varlen, softcap=True) for varlen in (False, True)
                    for dtype in DTYPES]


def matrix_attention_cases() -> list[AttentionCase]:
    return [
        AttentionCase(dtype, head_dim, MATRIX_LAYOUT_BLOCKS[layout], window is not None, mode == "varlen")
        for layout, head_dim, window, mode, dtype in itertools.product(
            MATRIX_LAYOUT_BLOCKS, MATRIX_HEAD_DIMS, MATRIX_WINDOWS, MATRIX_MODES, DTYPES
        )
    ]


def smoke_specializations() -> set:
    kernels = set().union(*(case.specializations() for case in SMOKE_ATTENTION + SMOKE_INT8 + SMOKE_ROTARY))
    return kernels | encoder_graph_specializations()


def matrix_specializations() -> set:
    rotary = {("rotary", dtype, _next_power_of_2(head_dim // 2)) for _, _, head_dim in MATRIX_ROTARY for dtype in DTYPES}
    attention = set().union(*(case.specializations()
                              for case in matrix_attention_cases() + WIDE_HEAD_ATTENTION + CAPPED_ATTENTION))
    return attention | rotary
