"""The C++ CPU kernels (backend="cpu") beyond the shared matrix in test_attention / test_int8:
every layout block size, bf16, each ISA build, exact int8 accumulation, and their error messages."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import TOLERANCES, relative_error
from modernbert_kernels import block_sparse_attention, int8_linear, layouts, native, quantize_per_token
from modernbert_kernels.reference import block_sparse_attention_reference, int8_matmul_reference

pytestmark = pytest.mark.skipif(not native.cpu_status()[0], reason=native.cpu_status()[1])


def random_qkv(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 5, 70], ids=["nowindow", "window5", "window70"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_block_sizes_and_dtypes_varlen_forward_and_backward(block_size, window, dtype, poison_allocations):
    lengths = [300, 1, 0, 129]
    layout = layouts.union(layouts.sliding_window(300, 64, block_size), layouts.global_tokens(300, block_size, block_size))
    q, k, v = random_qkv((sum(lengths), 3, 64), dtype, seed=block_size)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=window, cu_seqlens=cu, backend="cpu")
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=window, cu_seqlens=cu)
    ref.backward(dout.double())
    assert out.dtype == dtype
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", inputs, ref_inputs)
    ]:
        assert actual.dtype == dtype, name
        assert relative_error(actual, expected) <= TOLERANCES[dtype], name


@pytest.mark.parametrize("head_dim", [32, 128])
def test_padded_bf16_with_key_padding(head_dim, poison_allocations):
    q, k, v = random_qkv((2, 2, 200, head_dim), torch.bfloat16, seed=head_dim)
    keep = torch.ones(2, 200, dtype=torch.bool)
    keep[0, 150:] = False
    keep[1, :64] = False  # a whole key block padded out
    layout = layouts.bigbird(200, 32, 32, 2, 32, seed=1, num_heads=2)
    out = block_sparse_attention(q, k, v, layout, key_padding_mask=keep, backend="cpu")
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, key_padding_mask=keep)
    assert relative_error(out, ref) <= TOLERANCES[torch.bfloat16]


def test_lse_matches_reference():
    q, k, v = random_qkv((1, 2, 96, 64), torch.float32, seed=4)
    layout = layouts.sliding_window(96, 32, 32)
    row_offsets, col_indices = layout.tensors_on(torch.device("cpu"))[:2]
    out, lse = torch.ops.modernbert_kernels.block_sparse_attention_forward_native(
        q, k, v, row_offsets, col_indices, 32, 20, 0.125, None, None, 0
    )
    mask = layout.to_dense_mask(96)[0]
    pos = torch.arange(96)
    mask &= (pos[:, None] - pos[None, :]).abs() <= 20
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_isa_builds(isa):
    """The AVX2 and SSE2 builds (chosen at run time) give the same answers as the reference."""
    if isa == "avx2" and torch.ops.modernbert_kernels.cpu_isa() == "baseline":
        pytest.skip("this CPU has no AVX2")
    code = f"""
import torch
from modernbert_kernels import block_sparse_attention, int8_linear, layouts, quantize_per_token
from modernbert_kernels.reference import block_sparse_attention_reference, int8_linear_reference, quantize_per_row_reference
assert torch.ops.modernbert_kernels.cpu_isa() == "{isa}", torch.ops.modernbert_kernels.cpu_isa()
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 2, 150, 64, generator=g) for _ in range(3))
layout = layouts.sliding_window(150, 40, 32)
out = block_sparse_attention(q, k, v, layout, window=40, backend="cpu")
ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=40)
assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
x = torch.randn(37, 90, generator=g)  # 90 and 42: a scalar tail for every vector width
assert torch.equal(quantize_per_token(x, backend="cpu")[0], quantize_per_row_reference(x)[0])
x_q, x_scale = quantize_per_token(x[:, :80], backend="cpu")
w_q = torch.randint(-127, 128, (42, 80), generator=g, dtype=torch.int8)
w_scale, bias = torch.rand(42, generator=g) * 0.02, torch.randn(42, generator=g)
for act in (None, "gelu", "gelu_tanh", "geglu"):
    y = int8_linear(x_q, x_scale, w_q, w_scale, bias, act, torch.float32, backend="cpu")
    y_ref = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, act)
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item() <= 1e-5, act
"""
    env = dict(os.environ, MODERNBERT_KERNELS_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_accumulation_is_exact(out_dtype):
    """Unit scales and no bias: the output is the integer matmul itself (exact in fp32 for
    |values| < 2^24; bf16 is its correctly rounded value)."""
    generator = torch.Generator().manual_seed(9)
    x_q = torch.randint(-127, 128, (300, 1024), generator=generator, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (130, 1024), generator=generator, dtype=torch.int8)
    out = int8_linear(x_q, torch.ones(300), w_q, torch.ones(130), out_dtype=out_dtype, backend="cpu")
    expected = int8_matmul_reference(x_q, w_q)
    assert expected.abs().max() < 2**24
    assert torch.equal(out, expected.to(torch.float32).to(out_dtype))


def test_quantize_bf16_input_with_layernorm():
    generator = torch.Generator().manual_seed(10)
    x = (torch.randn(64, 200, generator=generator) * 3).bfloat16()
    weight = torch.rand(200, generator=generator) + 0.5
    q, scale = quantize_per_token(x, norm_weight=weight, backend="cpu")
    q_torch, scale_torch = quantize_per_token(x, norm_weight=weight, backend="torch")
    torch.testing.assert_close(scale, scale_torch, rtol=1e-5, atol=0)
    assert (q.int() - q_torch.int()).abs().max() <= 1


def test_native_op_errors_are_clear():
    q, k, v = random_qkv((1, 2, 64, 64), torch.float32, seed=0)
    layout = layouts.sliding_window(64, 32, 32)
    row_offsets, col_indices = layout.tensors_on(torch.device("cpu"))[:2]
    forward = torch.ops.modernbert_kernels.block_sparse_attention_forward_native
    with pytest.raises(RuntimeError, match="head_dim must be 32, 64 or 128"):
        forward(q[..., :48], k[..., :48], v[..., :48], row_offsets, col_indices, 32, -1, 1.0, None, None, 0)
    with pytest.raises(RuntimeError, match="layout covers 64 tokens"):
        big = [t.repeat(1, 1, 2, 1) for t in (q, k, v)]
        forward(*big, row_offsets, col_indices, 32, -1, 1.0, None, None, 0)
    with pytest.raises(RuntimeError, match="int32"):
        forward(q, k, v, row_offsets.long(), col_indices, 32, -1, 1.0, None, None, 0)
    with pytest.raises(RuntimeError, match="share K"):
        torch.ops.modernbert_kernels.int8_linear_native(
            torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8),
            None, "none", torch.float32,
        )
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        block_sparse_attention(q.to("meta"), k.to("meta"), v.to("meta"), layout, backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_dense_layout_bf16_forward_and_backward(backend):
    """Dense layouts in bf16 (the torch path hands them to PyTorch's fused kernel in bf16)."""
    q, k, v = random_qkv((2, 2, 192, 64), torch.bfloat16, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).bfloat16()
    layout = layouts.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, backend=backend)
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout)
    ref.backward(dout.double())
    assert out.dtype == torch.bfloat16
    for actual, expected in [(out, ref)] + [(t.grad, r.grad) for t, r in zip(inputs, ref_inputs)]:
        assert relative_error(actual, expected) <= TOLERANCES[torch.bfloat16]
