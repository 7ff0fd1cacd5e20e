"""The dense strategy on the CPU: PyTorch's fused attention kernel.

When every query block visits every key block and no token mask applies, the tile groups have no
work to skip, and PyTorch's fused CPU attention (which also returns the LSE the backward uses)
beats them (measured: 0.70 s vs 2.24 s at 8192 tokens, 12 heads; benchmarks/NOTES.md). Rows that
see no key would come out NaN there, so any key mask, window or causal mask takes the tile groups;
so does soft-capping, which PyTorch's kernel does not have.
"""

from __future__ import annotations

import torch


def applies(device: torch.device, dense: bool, window: tuple[int, int], softcap: float, key_padding_mask) -> bool:
    return device.type == "cpu" and dense and window == (-1, -1) and not softcap and key_padding_mask is None


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 stays bf16 (the kernel accumulates in fp32 and uses bf16 matmul units); fp16 has none
    # on CPUs and is computed in fp32.
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def forward(q, k, v, scale):
    """[batch, heads, seq, dim] tensors -> (out like q, lse [batch, heads, seq] fp32).

    Inputs are made contiguous first: the kernel walks key and value rows, and rows 9 KB apart
    (q, k, v sliced from a fused qkv) cost it more than the copies do (fp32 [1, 12, 8192, 64]:
    801 ms median as views, 730 ms with the copies in and out).
    """
    dtype = q.dtype
    q, k, v = (t.to(_work_dtype(dtype)).contiguous() for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out.to(dtype), lse.float()


def backward(dout, q, k, v, out, lse, scale):
    """(dq, dk, dv), contiguous, in q's dtype. Contiguous inputs as in the forward (454 vs 418 ms
    median for [1, 12, 4096, 64] fp32 from qkv slices)."""
    work = _work_dtype(q.dtype)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(t.to(work).contiguous() for t in (dout, q, k, v, out)), lse, 0.0, False, scale=scale
    )
    return tuple(g.to(q.dtype).contiguous() for g in grads)
