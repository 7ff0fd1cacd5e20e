"""W8A8 GEMM: int8 x int8 -> int32 accumulate, with the dequantization, bias, activation and a
residual connection fused into the epilogue.

out[m, n] = act(x_scale[m] * w_scale[n] * sum_k x_q[m, k] w_q[n, k] + bias[n]) + residual[m, n]

For GeGLU the weight rows of the two halves are interleaved at conversion time (row 2i is the
activated half's row i, row 2i + 1 the gate's row i), so each tile holds matching pairs of
columns and writes gelu(a) * b to half as many output columns: the [M, 2I] intermediate never
reaches memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import autotuning
from .configs import INT8_CONFIGS, int8_fixed_launch, int8_pruner

# Epilogues (constexpr): dequantized + activation, numbered as the C++ kernels' Activation enum
# (csrc/params.h), or the raw int32 accumulator (for exactness tests).
EPILOGUES = {None: 0, "gelu": 1, "gelu_tanh": 2, "geglu": 3, "int32": 4}


@triton.jit
def gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_tanh(x):
    # 0.5 * (1 + tanh(z)) == sigmoid(2 z)
    return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@triton.jit
def int8_matmul_kernel(
    A, B, Out, AScale, BScale, Bias, Residual,
    M, N, K,
    stride_am, stride_bn, stride_om,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row-tiles share each column-tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns wrap around instead of being masked: masked loads stop
    # software pipelining and cost registers (the compile check saw 0 -> 680 bytes of spills on
    # sm_90). Their results are never stored.
    rows_a = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    rows_b = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = A + rows_a[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    # W is [N, K] with K contiguous, like nn.Linear: load [BLOCK_N, BLOCK_K] rows and transpose
    # in the dot, which keeps the loads vectorized along K.
    b_ptrs = B + rows_b[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    # The launcher picks BLOCK_K dividing K (a multiple of 16): no K mask either.
    for _ in range(K // BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.trans(tl.load(b_ptrs)), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    row_ok = offs_m < M
    if EPILOGUE == 4:
        tl.store(Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc,
                 mask=row_ok[:, None] & (offs_n[None, :] < N))
    else:
        col_ok = offs_n < N
        a_scale = tl.load(AScale + offs_m, mask=row_ok, other=0.0)
        b_scale = tl.load(BScale + offs_n, mask=col_ok, other=0.0)
        y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            y += tl.load(Bias + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1:
            y = gelu_erf(y)
        if EPILOGUE == 2:
            y = gelu_tanh(y)
        if EPILOGUE == 3:
            activated, gate = tl.split(tl.reshape(y, [BLOCK_M, BLOCK_N // 2, 2]))
            half = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            offsets = offs_m[:, None].to(tl.int64) * stride_om + half[None, :]
            mask = row_ok[:, None] & (half[None, :] < N // 2)
            y = gelu_erf(activated) * gate
        else:
            offsets = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
        if HAS_RESIDUAL:  # laid out like Out
            y += tl.load(Residual + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + offsets, y.to(Out.dtype.element_ty), mask=mask)


# Not keyed on M: the encoder's token count changes every batch, and re-tuning each would cost more
# than it wins; tile choice depends mostly on N and K.
int8_matmul_tuned = triton.autotune(
    configs=INT8_CONFIGS, key=["N", "K", "EPILOGUE", "HAS_BIAS", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": int8_pruner},
)(int8_matmul_kernel)


def int8_matmul(a_q, b_q, a_scale=None, b_scale=None, bias=None, epilogue=None, out_dtype=torch.float16, tile=None,
                residual=None):
    """a_q [M, K] int8, b_q [N, K] int8 -> [M, N] (or [M, N / 2] for geglu) of out_dtype (int32 raw);
    ``residual`` (contiguous, the output's shape) is added last."""
    if a_q.shape[1] % 32:
        # K is a multiple of 16 but int8 MMA tiles need 32: zero columns add nothing.
        pad = 32 - a_q.shape[1] % 32
        a_q, b_q = (torch.nn.functional.pad(t, (0, pad)) for t in (a_q, b_q))
    m, k = a_q.shape
    n = b_q.shape[0]
    code = EPILOGUES[epilogue]
    out_cols = n // 2 if epilogue == "geglu" else n
    out = torch.empty(m, out_cols, device=a_q.device, dtype=torch.int32 if epilogue == "int32" else out_dtype)
    if m == 0 or out_cols == 0:
        return out
    dummy = a_q.new_empty(0, dtype=torch.float32)
    args = (a_q, b_q, out, dummy if a_scale is None else a_scale, dummy if b_scale is None else b_scale,
            dummy if bias is None else bias, dummy if residual is None else residual,
            m, n, k, a_q.stride(0), b_q.stride(0), out.stride(0))
    flags = dict(EPILOGUE=code, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None)
    if tile is None and autotuning():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        int8_matmul_tuned[grid](*args, **flags)
    else:
        launch = tile or int8_fixed_launch(k)
        if k % launch["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={launch['BLOCK_K']} must divide K={k}")
        grid = (triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"]),)
        int8_matmul_kernel[grid](*args, **flags, **launch)
    return out
