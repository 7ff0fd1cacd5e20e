"""The streamed GEMM (modernbert_kernels.streamed_gemm) against its float64 reference."""

import os
import subprocess
import sys

import pytest
import torch

from modernbert_kernels import native
from modernbert_kernels.streamed_gemm import (GATES, pack_streamed_weight, streamed_linear,
                                              streamed_linear_reference)

pytestmark = pytest.mark.skipif(not native.cpu_status()[0], reason="needs the C++ CPU kernels")

# max |error| / max |reference|: fp32 sums of up to ~800 products; bf16 inputs are exact in fp32 and
# the output is rounded to bf16 once (2^-8), gated or not.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.bfloat16]
# Rows: one token, a partial register block, one whole block (16 rows on AVX-512; an AMX tile's
# rows), a block and a tail (on AMX tiles, a block's second tile of one row), several blocks.
ROWS = [1, 5, 16, 17, 40]


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def poison_free_memory(shape, dtype):
    """Leave NaN in memory just freed, where the op's output is likely to be allocated, so an output
    element the kernel does not write fails the comparison."""
    torch.full(shape, float("nan"), dtype=dtype)


def random_problem(rows, in_features, out_features, dtype, gated, bias, residual, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(2 * out_features if gated else out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    # Biases and residuals as large as the products, so a dropped one fails.
    scale = max(in_features, 1) ** 0.5
    b = torch.randn(weight.shape[0], generator=generator) * scale if bias else None
    r = torch.randn(rows, out_features, generator=generator) * scale if residual else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(weight), cast(b), cast(r)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features, out_features", [(64, 32), (130, 50), (768, 96)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_linear_matches_float64(dtype, rows, in_features, out_features, bias, residual):
    x, weight, b, r = random_problem(rows, in_features, out_features, dtype, False, bias, residual,
                                     seed=rows * 1000 + in_features + out_features)
    packed = pack_streamed_weight(weight)
    before = None if r is None else r.clone()
    poison_free_memory((rows, out_features), dtype)
    out = streamed_linear(x, packed, out_features, b, residual=r)
    assert out.shape == (rows, out_features) and out.dtype == dtype
    assert relative_error(out, streamed_linear_reference(x, weight, b, residual=r)) < TOLERANCE[dtype]
    if r is not None:
        assert torch.equal(r, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("in_features, half", [(64, 16), (130, 7), (768, 40)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_gated_matches_float64(dtype, gate, rows, in_features, half, bias):
    """gate(x A^T + a) * (x G^T + g), the two halves packed side by side in each panel."""
    x, weight, b, _ = random_problem(rows, in_features, half, dtype, True, bias, False, seed=rows + in_features + half)
    packed = pack_streamed_weight(weight, gated=True)
    poison_free_memory((rows, half), dtype)
    out = streamed_linear(x, packed, half, b, gate=gate)
    assert out.shape == (rows, half) and out.dtype == dtype
    assert relative_error(out, streamed_linear_reference(x, weight, b, gate=gate)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 17, 40])
@pytest.mark.parametrize("in_features", [64, 130, 768])
@pytest.mark.parametrize("norm_bias", [True, False], ids=["norm_bias", "no_norm_bias"])
@pytest.mark.parametrize("gate", [None, "gelu"])
def test_layer_norm_prologue_matches_float64(dtype, rows, in_features, norm_bias, gate):
    """The LayerNorm run on x's rows in the same call: against layer_norm then the linear in
    float64, with inputs far from normalized (offset, scaled) and a non-trivial weight and bias."""
    out_features = 40
    x, weight, b, r = random_problem(rows, in_features, out_features, dtype, gate is not None, True, gate is None,
                                     seed=7 * rows + in_features)
    generator = torch.Generator().manual_seed(rows + in_features)
    x = (x.float() * 5 + 3).to(dtype)
    norm_weight = (torch.rand(in_features, generator=generator) + 0.5).to(dtype)
    norm_b = torch.randn(in_features, generator=generator).to(dtype) if norm_bias else None
    packed = pack_streamed_weight(weight, gated=gate is not None)
    before = x.clone()
    poison_free_memory((rows, in_features), dtype)
    out = streamed_linear(x, packed, out_features, b, gate, r, norm_weight=norm_weight, norm_bias=norm_b, eps=1e-5)
    expected = streamed_linear_reference(x, weight, b, gate, r, norm_weight=norm_weight, norm_bias=norm_b, eps=1e-5)
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert torch.equal(x, before)  # normalized into a copy
    # As F.layer_norm then the same GEMM: the prologue rounds the normed rows to x's dtype like it.
    normed = torch.nn.functional.layer_norm(x, (in_features,), norm_weight, norm_b, 1e-5)
    unfused = streamed_linear(normed, packed, out_features, b, gate, r)
    assert relative_error(out, unfused.double()) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rows_with_a_stride_and_leading_dims(dtype):
    """x's rows may be spaced wider than K (a slice of a fused projection), and leading dims are kept."""
    torch.manual_seed(0)
    wide = torch.randn(3, 7, 200).to(dtype)
    x = wide[..., :96]
    weight = torch.randn(64, 96).to(dtype)
    out = streamed_linear(x, pack_streamed_weight(weight), 64)
    assert out.shape == (3, 7, 64)
    assert relative_error(out, streamed_linear_reference(x, weight)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_no_rows_and_no_inputs(dtype):
    """No rows: an empty output. K = 0: every product is an empty sum, so the output is the bias."""
    weight = torch.randn(40, 32).to(dtype)
    assert streamed_linear(torch.randn(0, 32).to(dtype), pack_streamed_weight(weight), 40).shape == (0, 40)
    bias = torch.randn(40).to(dtype)
    out = streamed_linear(torch.randn(3, 0).to(dtype), pack_streamed_weight(torch.randn(40, 0).to(dtype)), 40, bias)
    assert torch.equal(out, bias.expand(3, 40))


def test_the_layout():
    """Panels of 32 columns, each two halves of 16 holding their K rows; bf16 pairs along K; gated
    panels 16 columns of A, then 16 of G; columns past N are zero."""
    weight = torch.arange(40 * 4, dtype=torch.float32).view(40, 4)
    packed = pack_streamed_weight(weight)
    assert packed.shape == (2, 2, 4, 16)
    assert torch.equal(packed[0, 0], weight[:16].T) and torch.equal(packed[0, 1], weight[16:32].T)
    assert torch.equal(packed[1, 0, :, :8], weight[32:].T) and not packed[1, 0, :, 8:].any() and not packed[1, 1].any()
    pairs = pack_streamed_weight(weight.bfloat16())
    assert pairs.shape == (2, 2, 2, 32)
    assert torch.equal(pairs[0, 1, 1, 2:4], weight[17, 2:4].bfloat16())  # column 17, k = 2 and 3
    gated = pack_streamed_weight(weight, gated=True)  # A = rows 0..19, G = rows 20..39
    assert gated.shape == (2, 2, 4, 16)
    assert torch.equal(gated[0, 0], weight[:16].T) and torch.equal(gated[0, 1], weight[20:36].T)
    assert torch.equal(gated[1, 0, :, :4], weight[16:20].T) and not gated[1, 0, :, 4:].any()
    assert torch.equal(gated[1, 1, :, :4], weight[36:40].T) and not gated[1, 1, :, 4:].any()


@pytest.mark.parametrize("call, message", [
    (lambda x, p: streamed_linear(x.half(), p, 64), "x must be fp32 or bf16"),
    (lambda x, p: streamed_linear(x.bfloat16(), p, 64), "of x's dtype"),
    (lambda x, p: streamed_linear(x[:, ::2], p, 64), "unit stride along K"),
    (lambda x, p: streamed_linear(x[:, :32], p, 64), r"must be \[panels, 2, 32, 16\] for K = 32"),
    (lambda x, p: streamed_linear(x, p, 65), "out_features = 65 does not fit 2 packed panels of 32"),
    (lambda x, p: streamed_linear(x, p, 32), "out_features = 32 does not fit"),
    (lambda x, p: streamed_linear(x, p, 64, torch.zeros(63)), r"bias must be \[64\]"),
    (lambda x, p: streamed_linear(x, p, 32, torch.zeros(32), gate="gelu"), r"bias must be \[64\]"),
    (lambda x, p: streamed_linear(x, p, 32, gate="tanh"), "gate must be none, gelu, gelu_tanh, silu or relu"),
    (lambda x, p: streamed_linear(x, p, 64, residual=torch.zeros(3, 64).bfloat16()), "residual must be"),
    (lambda x, p: streamed_linear(x, p, 32, gate="gelu", residual=torch.zeros(3, 32)), "takes no residual"),
    (lambda x, p: streamed_linear(x, p, 64, norm_weight=torch.ones(63)), r"norm_weight must be \[64\]"),
    (lambda x, p: streamed_linear(x, p, 64, norm_weight=torch.ones(64), norm_bias=torch.ones(2)),
     r"norm_bias must be \[64\]"),
    (lambda x, p: streamed_linear(x, p, 64, norm_bias=torch.ones(64)), "norm_bias needs norm_weight"),
    (lambda x, p: streamed_linear(x, p, 64, norm_weight=torch.ones(64), eps=-1.0), "eps must be non-negative"),
])
def test_bad_input_is_refused(call, message):
    x, packed = torch.randn(3, 64), pack_streamed_weight(torch.randn(64, 64))
    with pytest.raises(RuntimeError, match=message):
        call(x, packed)


@pytest.mark.parametrize("weight, gated, message", [
    (torch.randn(8, 5).bfloat16(), False, "bf16 with K even"),
    (torch.randn(8, 4).half(), False, "fp32, or bf16"),
    (torch.randn(8), False, r"\[N, K\]"),
    (torch.randn(7, 4), True, "even number of rows"),
])
def test_bad_weights_are_refused(weight, gated, message):
    with pytest.raises(ValueError, match=message):
        pack_streamed_weight(weight, gated)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512", "avx512_bf16", "amx"])
def test_every_kernel_build(isa):
    """Each build, with the library's kernels capped to it in a fresh process: 4, 8 and 16 lanes and
    their rows a register block; bf16 widened, through vdpbf16ps, or on AMX tiles (K a multiple of
    32: 96 here, in blocks of up to 32 rows: 40 is one and a part)."""
    script = (
        "import torch\n"
        "from modernbert_kernels import native\n"
        "from modernbert_kernels.streamed_gemm import pack_streamed_weight, streamed_linear, streamed_linear_reference\n"
        f"assert native.CPU_ISA == {isa!r}, native.CPU_ISA\n"
        "torch.manual_seed(0)\n"
        "for dtype, tolerance in ((torch.float32, 2e-6), (torch.bfloat16, 8e-3)):\n"
        "    for rows, k in ((1, 130), (3, 130), (17, 130), (1, 96), (17, 96), (40, 96)):\n"
        "        for gate in (None, 'gelu'):\n"
        "            x, w = torch.randn(rows, k).to(dtype), torch.randn(100, k).to(dtype)\n"
        "            b, r = torch.randn(100).to(dtype), None if gate else torch.randn(rows, 100).to(dtype) * 10\n"
        "            n = 50 if gate else 100\n"
        "            g = torch.rand(k).to(dtype) + 0.5 if rows != 3 else None\n"
        "            out = streamed_linear(x, pack_streamed_weight(w, gate is not None), n, b, gate, r, norm_weight=g)\n"
        "            ref = streamed_linear_reference(x, w, b, gate, r, norm_weight=g)\n"
        "            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()\n"
        "            assert out.shape == (rows, n) and err < tolerance, (dtype, rows, gate, err)\n"
    )
    if isa != "baseline" and not any(flag in open("/proc/cpuinfo").read() for flag in (f" {isa}", f" {isa}f")):
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, MODERNBERT_KERNELS_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
