"""GPU kernels (Triton, and the C++ extension's CUDA fallback when built with FORCE_CUDA=1), bf16,
fp16 and fp32, against float64."""

import pytest
import torch

from benchmarks import gpu_cases
from helpers import TOLERANCES, relative_error
from modernbert_kernels import block_sparse_attention, int8_linear, layouts, native, quantize_per_token, rotary_embedding
from modernbert_kernels.reference import int8_linear_reference, int8_matmul_reference, quantize_per_row_reference
from modernbert_kernels.reference import block_sparse_attention_reference, rotary_embedding_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def one_config(request, monkeypatch):
    """Correctness runs one shipped config per kernel: autotuning each of the ~100 problem classes
    here would spend minutes of a rare GPU session compiling. test_autotuned_launch tunes once."""
    if "autotuned" not in request.node.name:
        monkeypatch.setenv("MODERNBERT_KERNELS_AUTOTUNE", "0")

SEQ = 1000
# The layouts of the matrix; gpu_cases.MATRIX_LAYOUT_BLOCKS lists their blocks for the suite's plan.
GPU_LAYOUTS = {
    "sliding_window_64": lambda: layouts.sliding_window(SEQ, 64, 64),
    "sliding_window_128": lambda: layouts.sliding_window(SEQ, 100, 128),
    "bigbird_per_head": lambda: layouts.bigbird(SEQ, 64, 64, 2, 64, seed=1, num_heads=4),
    "global_tokens": lambda: layouts.global_tokens(SEQ, 64, 64),
    "fixed_32": lambda: layouts.fixed(SEQ, 128, 32, 32),
}


GPU_BACKENDS = [
    "triton",
    pytest.param("cuda", marks=pytest.mark.skipif(not native.cuda_status()[0], reason=native.cuda_status()[1])),
]


assert {name: layout().block_size for name, layout in GPU_LAYOUTS.items()} == gpu_cases.MATRIX_LAYOUT_BLOCKS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize("dtype", [DTYPES[name] for name in gpu_cases.DTYPES], ids=list(gpu_cases.DTYPES))
@pytest.mark.parametrize("mode", gpu_cases.MATRIX_MODES)
@pytest.mark.parametrize("window", gpu_cases.MATRIX_WINDOWS, ids=["nowindow", "window64"])
@pytest.mark.parametrize("head_dim", gpu_cases.MATRIX_HEAD_DIMS)
@pytest.mark.parametrize("layout_name", list(GPU_LAYOUTS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_on_gpu(backend, layout_name, head_dim, window, mode, dtype):
    layout = GPU_LAYOUTS[layout_name]()
    generator = torch.Generator(device="cuda").manual_seed(0)
    extra = {}
    if mode == "varlen":
        lengths = [SEQ, 333, 1, 640]
        shape = (sum(lengths), 4, head_dim)
        extra["cu_seqlens"] = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    else:
        shape = (2, 4, SEQ, head_dim)
        keep = torch.ones(2, SEQ, dtype=torch.bool, device="cuda")
        keep[1, 700:] = False
        extra["key_padding_mask"] = keep
    q, k, v, dout = (torch.randn(shape, device="cuda", generator=generator).to(dtype) for _ in range(4))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=window, backend=backend, **extra)
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=window, **extra)
    ref.backward(dout.double())
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", inputs, ref_inputs)
    ]:
        assert not torch.isnan(actual).any(), name
        assert relative_error(actual, expected) <= TOLERANCES[dtype], name


def test_torch_compile_autotuned_on_gpu():
    layout = layouts.sliding_window(512, 64, 64)
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, layout, window=64).float().sum(), fullgraph=True)
    fn(q, k, v).backward()
    assert q.grad is not None and not q.grad.isnan().any()


CUDA_ONLY = pytest.mark.skipif(not native.cuda_status()[0], reason=native.cuda_status()[1])


@CUDA_ONLY
@pytest.mark.parametrize("m, n, k", [(64, 64, 32), (77, 130, 144), (1, 96, 16), (300, 258, 784)])
def test_cuda_int8_linear_exact_and_epilogues(m, n, k):
    generator = torch.Generator().manual_seed(m)
    x_q = torch.randint(-127, 128, (m, k), generator=generator, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    exact = int8_linear(x_q.cuda(), ones_m, w_q.cuda(), ones_n, out_dtype=torch.float32, backend="cuda")
    assert torch.equal(exact.cpu().double(), int8_matmul_reference(x_q, w_q).double())
    x_scale, w_scale = torch.rand(m, generator=generator) * 0.02, torch.rand(n, generator=generator) * 0.02
    bias = torch.randn(n, generator=generator)
    for activation in (None, "gelu", "gelu_tanh", "geglu"):
        for out_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
            out = int8_linear(x_q.cuda(), x_scale.cuda(), w_q.cuda(), w_scale.cuda(), bias.cuda(), activation,
                              out_dtype=out_dtype, backend="cuda")
            expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation)
            assert out.dtype == out_dtype
            assert relative_error(out.cpu(), expected) <= tol, (activation, out_dtype)


@CUDA_ONLY
def test_cuda_quantize_matches_reference():
    x = torch.randn(40, 96, device="cuda") * 3
    x[3] = 0.0
    q, scale = quantize_per_token(x, backend="cuda")
    ref_q, ref_scale = quantize_per_row_reference(x.cpu())
    assert torch.equal(q.cpu(), ref_q)
    torch.testing.assert_close(scale.cpu().double(), ref_scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [DTYPES[name] for name in gpu_cases.DTYPES], ids=list(gpu_cases.DTYPES))
@pytest.mark.parametrize("tokens, heads, head_dim", gpu_cases.MATRIX_ROTARY)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_rotary_on_gpu(backend, tokens, heads, head_dim, dtype):
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=generator).to("cuda", dtype)
    angles = (torch.rand(tokens, head_dim // 2, generator=generator) * 100).cuda()
    cos, sin = angles.cos(), angles.sin()
    expected = rotary_embedding_reference(qkv[:, :2].cpu(), cos.cpu(), sin.cpu())
    out = rotary_embedding(qkv[:, :2], cos, sin, backend=backend)
    assert relative_error(out.cpu(), expected) <= TOLERANCES[dtype]
    v = qkv[:, 2].clone()
    rotary_embedding(qkv[:, :2], cos, sin, inplace=True, backend=backend)
    assert relative_error(qkv[:, :2].cpu(), expected) <= TOLERANCES[dtype]
    assert torch.equal(qkv[:, 2], v)
