"""Stage (a) of the GPU suite: one case per Triton kernel and dtype, forward and backward, against
float64 (benchmarks/gpu_cases.py lists the cases; the suite's plan counts their compiles)."""

import pytest
import torch

from benchmarks import gpu_cases
from helpers import TOLERANCES, relative_error
from modernbert_kernels import Int8Linear, block_sparse_attention, layouts, quantize_per_token, rotary_embedding
from modernbert_kernels.reference import (
    block_sparse_attention_reference, int8_linear_reference, quantize_per_row_reference, rotary_embedding_reference,
)

pytestmark = pytest.mark.gpu
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(autouse=True)
def one_config(monkeypatch):
    monkeypatch.setenv("MODERNBERT_KERNELS_AUTOTUNE", "0")


@pytest.mark.parametrize("case", gpu_cases.SMOKE_ATTENTION, ids=lambda c: c.dtype)
def test_attention_forward_and_backward(case):
    dtype, lengths = DTYPES[case.dtype], [700, 1, 333]
    cu_seqlens = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    layout = layouts.sliding_window(max(lengths), 64, case.layout_block)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(sum(lengths), 4, case.head_dim, device="cuda", generator=generator).to(dtype)
                     for _ in range(4))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=64, cu_seqlens=cu_seqlens, max_seqlen=max(lengths),
                                 backend="triton")
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=64, cu_seqlens=cu_seqlens)
    ref.backward(dout.double())
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", inputs, ref_inputs)
    ]:
        assert relative_error(actual, expected) <= TOLERANCES[dtype], name


@pytest.mark.parametrize("case", gpu_cases.SMOKE_INT8, ids=lambda c: c.out_dtype)
def test_int8_linear_with_fused_norm_and_geglu(case):
    dtype = DTYPES[case.out_dtype]
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(case.features, 2 * 1152)
    layer = Int8Linear.from_float(linear, activation=case.activation).cuda()
    x = (torch.randn(300, case.features, generator=generator) * 2).to("cuda", dtype)
    norm_weight = (torch.rand(case.features, generator=generator) + 0.5).to("cuda", dtype)
    x_q, x_scale = quantize_per_token(x, norm_weight=norm_weight, backend="triton")
    normed = torch.nn.functional.layer_norm(x.double(), (case.features,), norm_weight.double(), None, 1e-5)
    ref_q, ref_scale = quantize_per_row_reference(normed.cpu())
    assert (x_q.cpu().int() - ref_q.int()).abs().max() <= 1  # a rounding step at most (fp32 norm)
    torch.testing.assert_close(x_scale.cpu().double(), ref_scale, rtol=1e-3, atol=0)
    out = layer(x, norm_weight=norm_weight)
    expected = int8_linear_reference(x_q.cpu(), x_scale.cpu(), layer.weight_q.cpu(), layer.weight_scale.cpu(),
                                     layer.bias.cpu(), case.activation)
    assert out.dtype == dtype and out.shape == (300, 1152)
    assert relative_error(out.cpu(), expected) <= TOLERANCES[dtype]


@pytest.mark.parametrize("case", gpu_cases.SMOKE_ROTARY, ids=lambda c: c.dtype)
def test_rotary_forward_and_backward(case):
    dtype = DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(500, 2, 12, case.head_dim, generator=generator).to("cuda", dtype).requires_grad_()
    angles = (torch.rand(500, case.head_dim // 2, generator=generator) * 100).cuda()
    out = rotary_embedding(x, angles.cos(), angles.sin(), backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    ref = rotary_embedding_reference(x64, angles.cos().double(), angles.sin().double())
    ref.backward(grad.double())
    assert relative_error(out, ref) <= TOLERANCES[dtype]
    assert relative_error(x.grad, x64.grad) <= TOLERANCES[dtype]
