"""The C++ extension as a build: each ISA build it chooses from at run time gives the reference's
answers, and without it (a pure-Python install) the package still works: the reason is reported,
CPU calls pick the PyTorch path, and asking for backend="cpu" is a clear error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CPU_EXTENSION

CODE = """
import sys
sys.modules["modernbert_kernels._C"] = None  # as if the extension had not been built
import torch
from modernbert_kernels import block_sparse_attention, int8_linear, layouts, native, quantize_per_token
from modernbert_kernels.backends import default_backend
live, why = native.cpu_status()
assert not live and "not built" in why, why
assert default_backend(torch.device("cpu")) == "torch"
q, k, v = (torch.randn(1, 2, 128, 64) for _ in range(3))
out = block_sparse_attention(q, k, v, layouts.sliding_window(128, 32, 32), window=32)
assert out.shape == q.shape and not out.isnan().any()
x_q, x_scale = quantize_per_token(torch.randn(20, 64))
y = int8_linear(x_q, x_scale, x_q[:16], x_scale[:16], out_dtype=torch.float32)
assert y.shape == (20, 16)
try:
    block_sparse_attention(q, k, v, layouts.sliding_window(128, 32, 32), backend="cpu")
except ValueError as err:
    assert "not available" in str(err), err
else:
    raise AssertionError("backend='cpu' without the extension must fail")
print("ok")
"""


def test_pure_python_install_falls_back_cleanly():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@CPU_EXTENSION
@pytest.mark.parametrize("isa", ["avx512_bf16", "avx512", "avx2", "baseline"])
def test_narrower_isa_builds(isa):
    """The builds below the widest (chosen at run time) give the same answers as the reference: the
    AVX512-BF16 build (vdpbf16ps products; below the AMX build on CPUs with AMX), the AVX-512 build
    without it, AVX2 and SSE2. Attention in fp32 (forward and gradients), fp16 and bf16 (their keys
    converted, then transposed by each width's register transpose), and the int8 kernels, the
    int16-pair GEMM included."""
    widest = torch.ops.modernbert_kernels.cpu_isa()
    order = ["baseline", "avx2", "avx512", "avx512_bf16", "amx"]
    if order.index(isa) > order.index(widest):
        pytest.skip(f"this CPU runs the {widest} build at most")
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
for dtype in (torch.float16, torch.bfloat16):
    out = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, window=40, backend="cpu")
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-2, dtype
# The microkernels' tails: head_dim 32 and 128 (one and five full vector groups plus a tail at 8
# lanes), 16-token blocks (a two-vector tail), 150 tokens (a short last block).
for head_dim, block in ((32, 16), (128, 32)):
    qs, ks, vs = (torch.randn(1, 2, 150, head_dim, generator=g) for _ in range(3))
    small = layouts.dense(150, block)
    out = block_sparse_attention(qs, ks, vs, small, backend="cpu")
    ref_small = block_sparse_attention_reference(qs.double(), ks.double(), vs.double(), small)
    assert ((out.double() - ref_small).abs().max() / ref_small.abs().max()).item() <= 1e-5, head_dim
leaves = [t.clone().requires_grad_() for t in (q, k, v)]
leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
grad_out = torch.randn(2, 2, 150, 64, generator=g)
block_sparse_attention(*leaves, layout, window=40, backend="cpu").backward(grad_out)
block_sparse_attention_reference(*leaves64, layout, window=40).backward(grad_out.double())
for name, got, want in zip("qkv", leaves, leaves64):
    err = ((got.grad.double() - want.grad).abs().max() / want.grad.abs().max()).item()
    assert err <= 1e-5, (name, err)
x = torch.randn(37, 90, generator=g)  # 90 and 42: a scalar tail for every vector width
assert torch.equal(quantize_per_token(x, backend="cpu")[0], quantize_per_row_reference(x)[0])
# At and beside the rounding ties, every scale: the quotient by the inverse (FMA builds) or by
# division (baseline) rounds as fp32 division does.
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_int8 import near_ties
ties = near_ties(seed=52)[0]
assert torch.equal(quantize_per_token(ties, backend="cpu")[0], quantize_per_token(ties, backend="torch")[0])
x_q, x_scale = quantize_per_token(x[:, :80], backend="cpu")
w_q = torch.randint(-127, 128, (42, 80), generator=g, dtype=torch.int8)
w_scale, bias = torch.rand(42, generator=g) * 0.02, torch.randn(42, generator=g)
for act in (None, "gelu", "gelu_tanh", "geglu"):
    y = int8_linear(x_q, x_scale, w_q, w_scale, bias, act, torch.float32, backend="cpu")
    y_ref = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, act)
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item() <= 1e-5, act
# The int16-pair GEMM of CPUs without an int8 dot product, in this build's vector width: exact, with
# partial register tiles (rows) and weight panels (columns), and an odd K (the native op takes any
# K; the public one asks for multiples of 16).
import os
from modernbert_kernels.reference import int8_matmul_reference
os.environ["MODERNBERT_KERNELS_CPU_INT8_GEMM"] = "int16"
for m, n, k in ((1, 1, 1), (13, 37, 77), (40, 70, 256)):
    x_q, w_q = (torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for shape in ((m, k), (n, k)))
    y = torch.ops.modernbert_kernels.int8_linear_native(x_q, torch.ones(m), w_q, torch.ones(n), None, "none",
                                                          torch.float32)
    assert torch.equal(y, int8_matmul_reference(x_q, w_q).float()), (m, n, k)
"""
    env = dict(os.environ, MODERNBERT_KERNELS_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@CPU_EXTENSION
def test_extension_needs_no_cpp_symbol_of_libtorch():
    """Built on PyTorch's stable ABI: the shared object imports only C functions from libtorch
    (the stable shim), never a mangled c10::, at:: or torch:: symbol, so one build loads under every
    torch from its target version on. Reads the dynamic symbol table with nm."""
    import shutil

    from modernbert_kernels import _C

    if shutil.which("nm") is None:
        pytest.skip("binutils' nm is not installed")
    listing = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    # Each line is "U name" or "w name"; a demangled name may hold spaces.
    undefined = [line.split(maxsplit=1)[1] for line in listing.splitlines() if line.strip()]
    assert undefined, "nm listed no undefined symbols: not a shared object of this extension?"
    cpp_torch = [name for name in undefined
                 if name.startswith(("at::", "torch::", "caffe2::")) or "c10::" in name or "at::Tensor" in name]
    assert not cpp_torch, f"{len(cpp_torch)} C++ symbols of libtorch: {cpp_torch[:10]}"
    assert any(name.startswith(("aoti_torch_", "torch_")) for name in undefined), "no stable-ABI shim call found"
    assert _C.__file__.endswith(".abi3.so"), f"{_C.__file__}: not built on Python's limited API"
