"""The streamed GEMM: this library's fp32 / bf16 CPU linear for a few tokens, where a call's time is
its weight's trip from memory.

At 16 tokens ModernBERT-base's linears read 441 MB of fp32 weights a forward for 3.5 GFLOP, and
oneDNN's packed GEMM reads them at 10-11 GB/s on a 2-core Xeon whose cores read 25-28 GB/s. The
weight is packed once (``pack_streamed_weight``) in panels of 32 output columns, each two halves of
16 whose K rows are contiguous (bf16: pairs along K, the layout vdpbf16ps reads, and where K is a
multiple of 32 a run of AMX B tiles), so a call reads it front to back once, two streams at a time;
each thread takes a contiguous run of panels, computes every row against a panel while it is in
its core, and prefetches each stream 4 KB ahead (csrc/cpu/streamed_gemm_kernel.h). bf16 runs on
AMX tiles where the CPU has them, else through vdpbf16ps or widened to fp32 in registers. Gated
projections (GeGLU) keep 16 columns of the activated half and the same 16 of the gate in a panel,
so the activation and the product are the epilogue's, as are the bias and a residual add.

``cpu_linear`` offers it as the GEMM ``"streamed"`` beside oneDNN's and MKL's, and takes it where
it measures fastest (the few-token regimes). ``streamed_linear_reference`` is the float64 oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import native
from ._ops import ops

PANEL_COLUMNS = 32
# Gated activations the epilogue computes (GeGLU's gelu and its relatives).
GATES = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}
DTYPES = (torch.float32, torch.bfloat16)


def supports(dtype: torch.dtype, in_features: int) -> bool:
    """Whether the streamed GEMM computes a linear of this dtype and input width."""
    return dtype in DTYPES and (dtype == torch.float32 or in_features % 2 == 0)


def pack_streamed_weight(weight: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """``weight`` [N, K] (fp32, or bf16 with K even) in the streamed GEMM's layout: panels of 32
    columns, each two halves of 16: fp32 [panels, 2, K, 16], bf16 [panels, 2, K / 2, 32] (each
    column's pair along K side by side). ``gated``: the weight is [A; G] (two halves of N / 2 rows)
    and each panel holds 16 columns of A, then the same 16 of G. Columns past N are zero."""
    if weight.dim() != 2 or weight.device.type != "cpu" or not supports(weight.dtype, weight.shape[-1]):
        raise ValueError(f"the weight must be a [N, K] CPU tensor, fp32, or bf16 with K even (bf16 is packed in "
                         f"pairs along K), got {tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"a gated weight stacks two halves, so needs an even number of rows, got {weight.shape[0]}")
    weight = weight.detach()
    k = weight.shape[1]
    if gated:
        half = weight.shape[0] // 2
        panels = -(-half // (PANEL_COLUMNS // 2))
        halves = [F.pad(part, (0, 0, 0, panels * PANEL_COLUMNS // 2 - half)).view(panels, PANEL_COLUMNS // 2, k)
                  for part in (weight[:half], weight[half:])]
        columns = torch.cat(halves, dim=1)  # [panels, 32, K]
    else:
        panels = -(-weight.shape[0] // PANEL_COLUMNS)
        columns = F.pad(weight, (0, 0, 0, panels * PANEL_COLUMNS - weight.shape[0])).view(panels, PANEL_COLUMNS, k)
    half = PANEL_COLUMNS // 2
    if weight.dtype == torch.float32:
        return columns.view(panels, 2, half, k).transpose(2, 3).contiguous()
    return columns.view(panels, 2, half, k // 2, 2).permute(0, 1, 3, 2, 4).reshape(panels, 2, k // 2, 2 * half)


def streamed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                    gate: str | None = None, residual: torch.Tensor | None = None, *,
                    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                    eps: float = 1e-5) -> torch.Tensor:
    """x [..., K] against a ``pack_streamed_weight`` copy: x W^T + bias (+ residual), or with
    ``gate`` (a name of ``GATES``; the copy packed ``gated``) gate(x A^T + a) * (x G^T + g),
    out_features = N / 2 (bias [N] = [a; g]). Output in x's dtype, rounded once; fp32 sums. With
    ``norm_weight``, x is first ``F.layer_norm(x, (K,), norm_weight, norm_bias, eps)`` (rounded to
    x's dtype, as that returns it), in the same call. The C++ CPU kernels only."""
    if not native.cpu_status()[0]:
        raise RuntimeError(f"the streamed GEMM needs the C++ CPU kernels: {native.cpu_status()[1]}")
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # -1 is ambiguous when K = 0
    if residual is not None:
        residual = residual.reshape(rows.shape[0], out_features).contiguous()
    out = ops.streamed_linear_native(rows, packed, out_features, bias, gate or "none", residual, norm_weight,
                                     norm_bias, eps)
    return out.view(*x.shape[:-1], out_features)


def streamed_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                              gate: str | None = None, residual: torch.Tensor | None = None, *,
                              norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                              eps: float = 1e-5) -> torch.Tensor:
    """What ``streamed_linear`` computes, in float64 from the unpacked weight."""
    x = x.double()
    if norm_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], norm_weight.double(), None if norm_bias is None else norm_bias.double(), eps)
    out = F.linear(x, weight.double(), None if bias is None else bias.double())
    if gate is not None:
        activated, gated = out.chunk(2, dim=-1)
        return GATES[gate](activated) * gated
    return out if residual is None else out + residual.double()
