"""int8 quantization and W8A8 linear against exact integer and float64 references.

Without a GPU, backend="triton" runs the kernels in Triton's interpreter (int8 dots are exact there).
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import CPU_BACKENDS, CPU_EXTENSION, CUDA_EXTENSION, NATIVE_CPU_BACKENDS, relative_error

from modernbert_kernels import (
    Int8Linear,
    int8_linear,
    int8_linear_dynamic,
    interleave_geglu,
    quantize_per_channel,
    quantize_per_token,
)
from modernbert_kernels.int8 import ACTIVATIONS, _int8_linear_dynamic_op, _int8_linear_op, _quantize_op
from modernbert_kernels.reference import (
    int8_linear_reference,
    int8_matmul_reference,
    quantize_per_row_reference,
)

# Relative error of the fused epilogue vs float64, per output dtype.
EPILOGUE_TOLERANCE = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 1e-5}  # bf16: 2^-9 rounding
# M, N, K: tile multiples and not (the interpreter runs 32x32x32 tiles).
SHAPES = [(32, 64, 64), (50, 40, 48), (1, 96, 16), (77, 130, 144)]


def random_int8(*shape, seed):
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def relative(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def assert_rounds_as_float64(q, x, ref_q, ref_scale):
    """q from fp32 x / scale against float64's ref_q: the fp32 quotient is within ~2 ulp (1.5e-5 at
    127) of float64's, so the two may round a value that close to a .5 tie to neighbouring integers
    (the exact check failed 24 of 20,000 fresh 24 x 32 draws, and one CI run); anywhere else they must agree."""
    steps = x.double() / ref_scale[:, None]
    near_tie = (steps.abs().frac() - 0.5).abs() < 4e-5
    differ = q != ref_q
    assert (q.int() - ref_q.int()).abs().max() <= 1
    assert not (differ & ~near_tie).any(), steps[differ & ~near_tie]


@pytest.mark.interpreter
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_triton_int8_gemm_is_bit_exact(m, n, k, poison_allocations):
    from modernbert_kernels.triton.int8_matmul import int8_matmul

    x_q, w_q = random_int8(m, k, seed=1), random_int8(n, k, seed=2)
    acc = int8_matmul(x_q, w_q, epilogue="int32")
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), int8_matmul_reference(x_q, w_q))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "geglu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_linear_epilogue(backend, m, n, k, with_bias, activation, out_dtype, poison_allocations):
    if activation == "geglu" and n % 2:
        pytest.skip("geglu needs an even width")
    generator = torch.Generator().manual_seed(3)
    x_q, w_q = random_int8(m, k, seed=4), random_int8(n, k, seed=5)
    # Scales of realistic size: outputs of order 1 to 10.
    x_scale = torch.rand(m, generator=generator) * 0.02 + 0.005
    w_scale = torch.rand(n, generator=generator) * 0.02 + 0.005
    bias = torch.randn(n, generator=generator) if with_bias else None
    out = int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype=out_dtype, backend=backend)
    expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation)
    assert out.dtype == out_dtype and out.shape == expected.shape
    assert not out.isnan().any()
    assert relative(out, expected) <= EPILOGUE_TOLERANCE[out_dtype]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("activation", [None, "geglu"])
@pytest.mark.parametrize("m, n, k", [(50, 40, 48), (77, 130, 144)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_linear_adds_the_residual(backend, m, n, k, activation, out_dtype, poison_allocations):
    """The residual connection in the epilogue: act(...) + residual, rounded to out_dtype once. The
    residual is of the outputs' size, so a dropped or doubled one fails the tolerance, and it is
    read, not written."""
    if backend == "triton" and out_dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bf16")
    generator = torch.Generator().manual_seed(41)
    x_q, w_q = random_int8(m, k, seed=42), random_int8(n, k, seed=43)
    x_scale = torch.rand(m, generator=generator) * 0.02 + 0.005
    w_scale = torch.rand(n, generator=generator) * 0.02 + 0.005
    bias = torch.randn(n, generator=generator)
    cols = n // 2 if activation == "geglu" else n
    # Non-contiguous on purpose: the wrapper makes it contiguous for the kernels.
    residual = (torch.randn(cols, m, generator=generator) * 4).to(out_dtype).t()
    kept = residual.clone()
    out = int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype=out_dtype, backend=backend,
                      residual=residual)
    expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation, residual)
    assert out.dtype == out_dtype and out.shape == expected.shape
    assert torch.equal(residual, kept)
    assert relative(out, expected) <= EPILOGUE_TOLERANCE[out_dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantize_per_token_round_trip(backend, poison_allocations):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(40, 96, generator=generator) * 3
    x[3] = 0.0  # an all-zero row
    x[7, 11] = 1e4  # a row with one huge outlier
    q, scale = quantize_per_token(x, backend=backend)
    ref_q, ref_scale = quantize_per_row_reference(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert not scale.isnan().any() and (scale > 0).all()
    assert torch.equal(q, ref_q)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    error = (x.double() - q.double() * scale.double()[:, None]).abs()
    assert (error <= scale.double()[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(q[3], torch.zeros_like(q[3]))
    assert q[7, 11] == 127


def near_ties(seed, rows=48, k=96):
    """Rows whose values sit at and one ulp beside the rounding ties (j + 1/2) x scale, scales from
    2^-120 to 2^120 (past the [2^-90, 2^90] where the C++ kernel multiplies by 1 / scale instead of
    dividing), and fp32 scales with full mantissas: which way each rounds depends on the last bit of
    the quotient."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.linspace(-120, 120, rows).round()
    scale = ((1 + torch.rand(rows, generator=generator)) * 2.0**exponents).float()
    amax = (scale * 127).float()
    scale = amax / 127  # what the kernels compute from the row's amax
    steps = torch.randint(-126, 127, (rows, k), generator=generator).float() + 0.5
    x = (steps * scale[:, None]).float()
    side = torch.randint(-1, 2, (rows, k), generator=generator)  # the tie's value, or the ulp below or above
    x = torch.where(side > 0, x.nextafter(torch.tensor(float("inf"))),
                    torch.where(side < 0, x.nextafter(torch.tensor(float("-inf"))), x))
    x[:, 0] = amax
    return x, steps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantization_rounds_the_exact_fp32_quotient(backend, poison_allocations):
    """Every CPU backend gets the quotient by the scale that fp32 division gives (correctly rounded;
    the C++ kernel by an FMA-corrected product), so at and next to the ties each value rounds as the
    torch backend's x / scale does: the same int8 values, bit for bit, at every scale."""
    x, steps = near_ties(seed=51)
    q, scale = quantize_per_token(x, backend=backend)
    expected_q, expected_scale = quantize_per_token(x, backend="torch")
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, expected_q), (q != expected_q).nonzero()[:5]
    # The values straddle the ties: some round away from zero (j + 1/2 -> j + 1), some toward it.
    away = (steps + steps.sign() * 0.5)[:, 1:]
    assert 0.2 < (q[:, 1:] == away).float().mean() < 0.8


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_layernorm_and_smoothing_quantize(backend):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(33, 80, generator=generator) * 2 + 1
    weight = torch.rand(80, generator=generator) + 0.5
    smooth = torch.rand(80, generator=generator) + 0.5
    q, scale = quantize_per_token(x, norm_weight=weight, eps=1e-5, smooth=smooth, backend=backend)
    normed = torch.nn.functional.layer_norm(x.double(), (80,), weight.double(), None, 1e-5) * smooth.double()
    ref_q, ref_scale = quantize_per_row_reference(normed)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-5, atol=0)
    # fp32 LayerNorm may land a value on the other side of a rounding boundary: off by one at most.
    assert (q.int() - ref_q.int()).abs().max() <= 1
    assert (q != ref_q).float().mean() < 0.01


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "layernorm_and_smoothing"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_activations_propagate(backend, fused, poison_allocations):
    """A row holding a NaN, +Inf or -Inf gets scale NaN (and int8 zeros), so the linear layer's
    output row is NaN instead of numbers made from a garbage scale; other rows are untouched."""
    generator = torch.Generator().manual_seed(31)
    bad = torch.tensor([False, True, False, True, True, False])
    for k in (72, 80):  # 72: a scalar tail on every CPU vector width; 80: what the linear takes
        x = torch.randn(6, k, generator=generator) * 3
        x[1, k - 2], x[3, 5], x[4, 0] = float("nan"), float("inf"), float("-inf")
        options = dict(norm_weight=torch.rand(k, generator=generator) + 0.5,
                       smooth=torch.rand(k, generator=generator) + 0.5) if fused else {}
        x_q, x_scale = quantize_per_token(x, backend=backend, **options)
        assert x_scale[bad].isnan().all() and not x_scale[~bad].isnan().any()
        assert not x_q[bad].any()
        clean_q, clean_scale = quantize_per_token(x[~bad], backend=backend, **options)
        assert torch.equal(x_q[~bad], clean_q) and torch.equal(x_scale[~bad], clean_scale)
    w_q, w_scale = quantize_per_channel(torch.randn(40, 80, generator=generator))
    y = int8_linear(x_q, x_scale, w_q, w_scale, None, "gelu", out_dtype=torch.float32, backend=backend)
    assert y[bad].isnan().all() and torch.isfinite(y[~bad]).all()


@pytest.mark.parametrize("m, n, k", [(0, 40, 48), (7, 0, 48), (7, 40, 0), (0, 0, 0)],
                         ids=["no_rows", "no_weight_rows", "no_columns", "nothing"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_operands(backend, m, n, k):
    """Empty operands: quantizing gives empty int8 and scale 1 (all-zero rows); the linear gives
    act(bias), as nn.Linear does with no input features, with no kernel launched."""
    generator = torch.Generator().manual_seed(12)
    x_q, x_scale = quantize_per_token(torch.randn(m, k, generator=generator), backend=backend)
    assert x_q.shape == (m, k) and x_q.dtype == torch.int8 and x_scale.shape == (m,)
    if k == 0:
        assert torch.equal(x_scale, torch.ones(m))
    w_q, w_scale = quantize_per_channel(torch.randn(n, k, generator=generator))
    bias = torch.randn(n, generator=generator)
    for activation in ACTIVATIONS:
        out = int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype=torch.float32, backend=backend)
        expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation)
        assert out.shape == expected.shape
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("extras", ["none", "layernorm_smoothing_residual"])
@pytest.mark.parametrize("activation", [None, "geglu"])
@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32_to_fp16", "bf16"])
@pytest.mark.parametrize("m, n, k", [(1, 96, 16), (77, 130, 144)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_linear_dynamic_is_quantize_then_int8_linear(backend, m, n, k, x_dtype, out_dtype, activation, extras,
                                                          poison_allocations):
    """One op for the two: bit-identical to quantize_per_token then int8_linear on the same backend
    (the C++ CPU backend's single native call included), and within the epilogue's tolerance of
    their float64 references. The two ops' own tests cover their shapes and options one by one;
    here each option reaches the one op once (fp16 out of fp32 x; the fused LayerNorm, smoothing
    and residual together)."""
    if backend == "triton" and torch.bfloat16 in (x_dtype, out_dtype):
        pytest.skip("Triton's interpreter has no bf16")
    residual = fused = extras != "none"
    generator = torch.Generator().manual_seed(71)
    x = (torch.randn(m, k, generator=generator) * 2 + 0.5).to(x_dtype)
    w_q, w_scale = quantize_per_channel(torch.randn(n, k, generator=generator) / k**0.5)
    bias = torch.randn(n, generator=generator)
    options = dict(norm_weight=(torch.rand(k, generator=generator) + 0.5).to(x_dtype), eps=1e-5,
                   smooth=torch.rand(k, generator=generator) + 0.5) if fused else {}
    cols = n // 2 if activation == "geglu" else n
    added = (torch.randn(m, cols, generator=generator) * 4).to(out_dtype) if residual else None
    out = int8_linear_dynamic(x, w_q, w_scale, bias, activation, out_dtype, residual=added, backend=backend, **options)
    x_q, x_scale = quantize_per_token(x, backend=backend, **options)
    two_ops = int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, backend=backend, residual=added)
    assert out.dtype == out_dtype and out.shape == (m, cols)
    assert torch.equal(out, two_ops)
    expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation, added)
    assert relative(out, expected) <= EPILOGUE_TOLERANCE[out_dtype]


@pytest.mark.parametrize("m, n, k", [(0, 40, 48), (7, 0, 48), (7, 40, 0)], ids=["no_rows", "no_weight_rows",
                                                                               "no_columns"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_linear_dynamic_on_empty_operands(backend, m, n, k):
    generator = torch.Generator().manual_seed(72)
    x = torch.randn(m, k, generator=generator)
    w_q, w_scale = quantize_per_channel(torch.randn(n, k, generator=generator))
    bias = torch.randn(n, generator=generator)
    out = int8_linear_dynamic(x, w_q, w_scale, bias, "gelu", backend=backend)
    x_q, x_scale = quantize_per_token(x, backend=backend)
    assert torch.equal(out, int8_linear(x_q, x_scale, w_q, w_scale, bias, "gelu", torch.float32, backend=backend))


def test_int8_linear_dynamic_bad_inputs():
    x, (w_q, w_scale) = torch.randn(8, 32), quantize_per_channel(torch.randn(16, 32))
    with pytest.raises(TypeError, match="floating-point"):
        int8_linear_dynamic(w_q, w_q, w_scale)
    with pytest.raises(TypeError, match="w_q must be a torch.int8 tensor"):
        int8_linear_dynamic(x, w_q.float(), w_scale)
    with pytest.raises(TypeError, match="w_scale must be a torch.float32 tensor"):
        int8_linear_dynamic(x, w_q, w_scale.double())
    with pytest.raises(ValueError, match="w_q is on meta but x is on cpu"):
        int8_linear_dynamic(x, w_q.to("meta"), w_scale)
    with pytest.raises(ValueError, match="share K"):
        int8_linear_dynamic(x[:, :16], w_q, w_scale)
    with pytest.raises(ValueError, match=r"w_scale must be \[16\]"):
        int8_linear_dynamic(x, w_q, w_scale[:8])
    with pytest.raises(ValueError, match="multiple of 16"):
        int8_linear_dynamic(x[:, :24], w_q[:, :24], w_scale)
    with pytest.raises(ValueError, match="norm_weight"):
        int8_linear_dynamic(x, w_q, w_scale, norm_weight=torch.ones(31))
    with pytest.raises(ValueError, match="activation must be one of"):
        int8_linear_dynamic(x, w_q, w_scale, activation="relu")
    with pytest.raises(ValueError, match=r"residual must be \[8, 16\]"):
        int8_linear_dynamic(x, w_q, w_scale, residual=torch.zeros(8, 8))


def test_quantize_per_channel():
    w = torch.randn(24, 32)  # fresh each run: a value on a rounding tie comes up now and then
    q, scale = quantize_per_channel(w)
    ref_q, ref_scale = quantize_per_row_reference(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    assert_rounds_as_float64(q, w, ref_q, ref_scale)


def test_interleave_geglu_pairs_rows():
    t = torch.arange(8)
    assert interleave_geglu(t).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("activation", [None, "gelu", "geglu"])
@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "smoothquant"])
def test_int8_linear_module_tracks_float_layer_and_round_trips(activation, calibrated, tmp_path):
    torch.manual_seed(8)
    linear = torch.nn.Linear(128, 96)
    x = torch.randn(4, 16, 128)
    x[..., :3] *= 10  # outlier channels, as in real activations
    float_out = linear(x)
    if activation == "gelu":
        float_out = torch.nn.functional.gelu(float_out)
    if activation == "geglu":
        a, b = float_out.chunk(2, -1)
        float_out = torch.nn.functional.gelu(a) * b
    layer = Int8Linear.from_float(linear, activation=activation, calibration=x if calibrated else None)
    out = layer(x)
    assert out.shape == float_out.shape and out.dtype == x.dtype
    assert relative(out, float_out.double()) < 0.05
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    loaded = Int8Linear(128, 96, activation=activation, smoothed=calibrated)
    loaded.load_state_dict(torch.load(tmp_path / "layer.pt"))
    assert torch.equal(loaded(x), out)


def test_bad_inputs():
    x_q, w_q = random_int8(8, 32, seed=1), random_int8(16, 32, seed=2)
    scales = torch.ones(8), torch.ones(16)
    with pytest.raises(TypeError, match="x_q must be"):
        int8_linear(x_q.float(), scales[0], w_q, scales[1])
    with pytest.raises(ValueError, match="multiple of 16"):
        int8_linear(x_q[:, :24], scales[0], w_q[:, :24], scales[1])
    with pytest.raises(ValueError, match="share K"):
        int8_linear(x_q, scales[0], w_q[:, :16], scales[1])
    too_long = torch.zeros(1, 2**17 + 16, dtype=torch.int8)  # int32 sums could pass 2^31
    with pytest.raises(ValueError, match="could overflow"):
        int8_linear(too_long, torch.ones(1), too_long, torch.ones(1))
    with pytest.raises(ValueError, match="x_scale must be"):
        int8_linear(x_q, torch.ones(7), w_q, scales[1])
    with pytest.raises(ValueError, match="activation"):
        int8_linear(x_q, *scales[:1], w_q, scales[1], activation="relu")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_per_token(x_q)
    with pytest.raises(ValueError, match="norm_weight"):
        quantize_per_token(torch.randn(4, 32), norm_weight=torch.ones(31))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x = torch.randn(20, 32)
    torch.library.opcheck(_quantize_op, (x, torch.rand(32) + 0.5, 1e-5, None, backend))
    x_q, x_scale = quantize_per_token(x, backend=backend)
    w_q, w_scale = quantize_per_channel(torch.randn(24, 32))
    # GeGLU with a residual (its fake output's width is the halved one): both optional inputs.
    for activation, residual in (("none", None), ("geglu", torch.randn(20, 12))):
        torch.library.opcheck(_int8_linear_op, (x_q, x_scale, w_q, w_scale, torch.randn(24), activation,
                                                torch.float32, backend, residual))
    for norm_weight, smooth in ((None, None), (torch.rand(32) + 0.5, torch.rand(32) + 0.5)):
        torch.library.opcheck(_int8_linear_dynamic_op, (x, norm_weight, 1e-5, smooth, w_q, w_scale, torch.randn(24),
                                                        "geglu", torch.float32, backend, torch.randn(20, 12)))
    if backend == "cpu":  # the C++ backend's packed weight, the ops' last optional input
        from modernbert_kernels import int8_pack_weight

        torch.library.opcheck(_int8_linear_op, (x_q, x_scale, w_q, w_scale, None, "gelu", torch.bfloat16, backend,
                                                None, int8_pack_weight(w_q)))
        torch.library.opcheck(_int8_linear_dynamic_op, (x, None, 1e-5, None, w_q, w_scale, None, "gelu",
                                                        torch.bfloat16, backend, None, int8_pack_weight(w_q)))


def test_torch_compile_traces_int8_linear():
    torch.manual_seed(9)
    layer = Int8Linear.from_float(torch.nn.Linear(64, 48), activation="gelu")
    x = torch.randn(40, 64)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@CPU_EXTENSION
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


def amx_int8_runs() -> bool:
    """Whether the C++ backend's AMX GEMM can run here (the OS's consent aside, which it asks for)."""
    from modernbert_kernels.backends import cpu_capabilities

    return bool(cpu_capabilities().get("amx_int8")) and os.environ.get("MODERNBERT_KERNELS_CPU_ISA") in (None, "amx")


@pytest.mark.parametrize("gemm", ["amx", "int8", "int16", "float"])
@pytest.mark.parametrize("k", [64, 1040, 1056, 4096], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("backend", NATIVE_CPU_BACKENDS)
def test_every_cpu_gemm_gives_the_exact_integer_products(backend, k, gemm, monkeypatch, poison_allocations):
    """The C++ backend's AMX kernel, oneDNN's int8 GEMM and the two that CPUs without VNNI / AMX run
    instead (the C++ backend's int16-pair kernel, exact fp32 GEMMs): the same integer products. K on
    both sides of fp32's exact limit (1040), 40 rows and 24 columns (partial register tiles and
    weight panels at every vector width and tile), rows and columns at +-127 so that partial sums
    reach 127 * 127 * K."""
    import modernbert_kernels.int8 as int8

    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", gemm)
    x_q, w_q = random_int8(40, k, seed=11), random_int8(24, k, seed=12)
    x_q[:3], w_q[:2], w_q[2:4] = 127, 127, -127
    if gemm == "int8" and not int8.cpu_int8_gemm_is_exact():  # oneDNN without VNNI / AMX saturates
        with pytest.raises(RuntimeError, match="does not sum int8 products exactly"):
            int8_linear(x_q, torch.ones(40), w_q, torch.ones(24), out_dtype=torch.float32, backend=backend)
        return
    if gemm in ("amx", "int16") and backend == "torch":
        with pytest.raises(RuntimeError, match=f"{gemm} is the C.. backend's GEMM"):
            int8_linear(x_q, torch.ones(40), w_q, torch.ones(24), out_dtype=torch.float32, backend=backend)
        return
    if gemm == "amx" and not amx_int8_runs():
        with pytest.raises(RuntimeError, match="AMX-INT8 cannot run here"):
            int8_linear(x_q, torch.ones(40), w_q, torch.ones(24), out_dtype=torch.float32, backend=backend)
        return
    out = int8_linear(x_q, torch.ones(40), w_q, torch.ones(24), out_dtype=torch.float32, backend=backend)
    expected = int8_matmul_reference(x_q, w_q)
    assert expected.abs().max() == 127 * 127 * k
    assert torch.equal(out, expected.to(torch.float32))  # exact below 2^24, correctly rounded above


@CPU_EXTENSION
@pytest.mark.parametrize("gemm", ["amx", "int16"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (16, 16, 64), (32, 32, 64), (40, 24, 100), (33, 97, 191),
                                   (64, 96, 768), (96, 80, 1152), (130, 64, 768)], ids=str)
def test_own_cpu_gemms_on_every_tile_edge(gemm, m, n, k, monkeypatch, poison_allocations):
    """The C++ backend's own GEMMs on the native op, which takes any K: whole and partial row blocks
    (32 rows for AMX) and column panels (32 and 16 columns), K a multiple of the AMX block (64) and
    not (its rows then read from a padded copy), a last partial row block after whole ones, and
    one row, column and K value. Exact against the float64 product."""
    import platform

    if gemm == "amx" and not amx_int8_runs():
        pytest.skip("the CPU has no AMX-INT8 (its refusal is tested above)")
    if gemm == "int16" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the int16-pair GEMM is built for x86 only")
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", gemm)
    x_q, w_q = random_int8(m, k, seed=m + k), random_int8(n, k, seed=n * k)
    x_q[0], w_q[-1] = 127, -127
    expected = int8_matmul_reference(x_q, w_q)
    assert expected.abs().max() == 127 * 127 * k
    generator = torch.Generator().manual_seed(m * n)
    x_scale, w_scale = torch.rand(m, generator=generator) * 0.02, torch.rand(n, generator=generator) * 0.02
    bias = torch.randn(n, generator=generator)
    threads = torch.get_num_threads()
    try:
        # The AMX schedule splits the columns into one group per thread: 1 group, 2, and 3 (the
        # last one empty when there are fewer than 3 panels' worth of columns left for it).
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = torch.ops.modernbert_kernels.int8_linear_native(x_q, torch.ones(m), w_q, torch.ones(n), None,
                                                                  "none", torch.float32)
            assert torch.equal(out, expected.to(torch.float32)), count
            if n % 2 == 0:  # the epilogue over each group's columns: GeGLU pairs, bias, a residual, bf16 output
                residual = torch.randn(m, n // 2, generator=generator).to(torch.bfloat16)
                out = torch.ops.modernbert_kernels.int8_linear_native(x_q, x_scale, w_q, w_scale, bias, "geglu",
                                                                      torch.bfloat16, residual)
                reference = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, "geglu", residual)
                assert relative(out, reference) <= EPILOGUE_TOLERANCE[torch.bfloat16], count
        with pytest.raises(RuntimeError, match=r"residual must be a contiguous \[%d, %d\] tensor" % (m, n)):
            torch.ops.modernbert_kernels.int8_linear_native(x_q, x_scale, w_q, w_scale, bias, "none", torch.float32,
                                                            torch.zeros(m, n, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)


def own_cpu_gemms() -> list[str]:
    """The GEMMs the C++ backend can be forced to here: its AMX and int16-pair kernels (x86), and
    oneDNN's and the fp32 one, which read w_q as it is."""
    import platform

    import modernbert_kernels.int8 as int8

    found = ["float"] + (["int8"] if int8.cpu_int8_gemm_is_exact() else [])
    if platform.machine() in ("x86_64", "AMD64"):
        found.append("int16")
    if amx_int8_runs():
        found.append("amx")
    return found


@CPU_EXTENSION
@pytest.mark.parametrize("activation", [None, "geglu"])
@pytest.mark.parametrize("m,n,k", [(1, 2, 16), (16, 96, 768), (40, 66, 1152), (130, 64, 208)], ids=str)
def test_a_packed_weight_gives_what_packing_per_call_gives(m, n, k, activation, monkeypatch, poison_allocations):
    """int8_pack_weight's copy on every GEMM the C++ backend can run here: the same output as w_q
    packed inside the call, bit for bit, and the exact integer products with unit scales. Whole and
    partial row blocks and column panels; one thread and two (the AMX schedule's column groups)."""
    from modernbert_kernels import int8_pack_weight

    x_q, w_q = random_int8(m, k, seed=m + n), random_int8(n, k, seed=k)
    x_q[0], w_q[-1] = 127, -127
    generator = torch.Generator().manual_seed(n)
    x_scale, w_scale = torch.rand(m, generator=generator) * 0.02, torch.rand(n, generator=generator) * 0.02
    bias = torch.randn(n, generator=generator)
    expected = int8_matmul_reference(x_q, w_q)
    threads = torch.get_num_threads()
    try:
        for gemm in own_cpu_gemms():
            monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", gemm)
            packed = int8_pack_weight(w_q)
            for count in (1, 2):
                torch.set_num_threads(count)
                exact = int8_linear(x_q, torch.ones(m), w_q, torch.ones(n), out_dtype=torch.float32, backend="cpu",
                                    packed_weight=packed)
                assert torch.equal(exact, expected.to(torch.float32)), (gemm, count)
                args = (x_q, x_scale, w_q, w_scale, bias, activation)
                out = int8_linear(*args, out_dtype=torch.bfloat16, backend="cpu", packed_weight=packed)
                assert torch.equal(out, int8_linear(*args, out_dtype=torch.bfloat16, backend="cpu")), (gemm, count)
    finally:
        torch.set_num_threads(threads)


@CPU_EXTENSION
def test_a_packed_weight_is_checked_against_the_call(monkeypatch):
    """A copy made for another GEMM than the one now forced: the call packs w_q itself (the right
    products). One made for another shape, a tensor int8_pack_weight did not make, or a truncated
    one: a clear error. Backends other than the C++ one read w_q and ignore it."""
    from modernbert_kernels import int8_pack_weight

    x_q, w_q = random_int8(20, 64, seed=1), random_int8(24, 64, seed=2)
    expected = int8_matmul_reference(x_q, w_q).to(torch.float32)
    gemms = own_cpu_gemms()
    for made_for, used_with in zip(gemms, gemms[1:] + gemms[:1]):
        monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", made_for)
        packed = int8_pack_weight(w_q)
        monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", used_with)
        out = int8_linear(x_q, torch.ones(20), w_q, torch.ones(24), out_dtype=torch.float32, backend="cpu",
                          packed_weight=packed)
        assert torch.equal(out, expected), (made_for, used_with)
    monkeypatch.delenv("MODERNBERT_KERNELS_CPU_INT8_GEMM")
    packed = int8_pack_weight(w_q)
    call = dict(out_dtype=torch.float32, backend="cpu")
    with pytest.raises(RuntimeError, match=r"made for a \[24, 64\] weight, but w_q is \[32, 64\]"):
        int8_linear(x_q, torch.ones(20), random_int8(32, 64, seed=3), torch.ones(32), packed_weight=packed, **call)
    with pytest.raises(RuntimeError, match="was not made by int8_pack_weight"):
        int8_linear(x_q, torch.ones(20), w_q, torch.ones(24), packed_weight=random_int8(packed.numel(), seed=4), **call)
    if packed.numel() > 64:  # a GEMM with a layout of its own
        with pytest.raises(RuntimeError, match="bytes where its header promises"):
            int8_linear(x_q, torch.ones(20), w_q, torch.ones(24), packed_weight=packed[:-1], **call)
    with pytest.raises(TypeError, match="packed_weight must be what int8_pack_weight"):
        int8_linear(x_q, torch.ones(20), w_q, torch.ones(24), packed_weight=packed.float(), **call)
    with pytest.raises(TypeError, match=r"w_q must be an \[N, K\] int8 tensor"):
        int8_pack_weight(w_q.float())
    out = int8_linear(x_q, torch.ones(20), w_q, torch.ones(24), out_dtype=torch.float32, backend="torch",
                      packed_weight=packed)
    assert torch.equal(out, expected)


@CPU_EXTENSION
def test_int8_linear_packs_its_weight_once_and_again_after_it_changes(monkeypatch):
    """Int8Linear on the C++ CPU backend packs weight_q at its first call, reuses it, and packs again
    after weight_q changes in place or is loaded anew; each output matches the float64 reference of
    the weight it then holds."""
    import modernbert_kernels.int8 as int8

    made = []
    pack = int8.int8_pack_weight
    monkeypatch.setattr(int8, "int8_pack_weight", lambda w_q: made.append(w_q.data_ptr()) or pack(w_q))
    torch.manual_seed(5)
    layer = Int8Linear.from_float(torch.nn.Linear(64, 48), activation="gelu")
    x = torch.randn(10, 64)

    def expected():
        x_q, x_scale = quantize_per_token(x, backend="cpu")
        return int8_linear_reference(x_q, x_scale, layer.weight_q, layer.weight_scale, layer.bias, "gelu")

    for _ in range(3):
        assert relative(layer(x), expected()) <= EPILOGUE_TOLERANCE[torch.float32]
    assert len(made) == 1
    layer.weight_q.copy_(layer.weight_q.flip(0))
    assert relative(layer(x), expected()) <= EPILOGUE_TOLERANCE[torch.float32]
    state = Int8Linear.from_float(torch.nn.Linear(64, 48), activation="gelu").state_dict()
    layer.load_state_dict(state)
    assert relative(layer(x), expected()) <= EPILOGUE_TOLERANCE[torch.float32]
    assert len(made) == 3


def test_cpu_gemm_choice(monkeypatch):
    import modernbert_kernels.int8 as int8

    for has_dot_product, exact, chosen in ((True, True, "int8"), (False, True, "float"), (True, False, "float")):
        monkeypatch.setattr(int8, "cpu_has_int8_dot_product", lambda has=has_dot_product: has)
        monkeypatch.setattr(int8, "cpu_int8_gemm_is_exact", lambda exact=exact: exact)
        assert int8.cpu_int8_gemm() == chosen
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", "int8")
    with pytest.raises(RuntimeError, match="does not sum int8 products exactly"):
        int8.cpu_int8_gemm()  # the last case's GEMM, not exact, refused when forced
    monkeypatch.setattr(int8, "cpu_int8_gemm_is_exact", lambda: True)
    assert int8.cpu_int8_gemm() == "int8"
    for own in ("amx", "int16"):  # the C++ backend's kernels only
        monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", own)
        with pytest.raises(RuntimeError, match=f"{own} is the C.. backend's GEMM"):
            int8.cpu_int8_gemm()


@CPU_EXTENSION
def test_cpu_backend_gemm_choice(monkeypatch):
    """The C++ backend's own choice: its AMX kernel where the CPU has AMX-INT8, oneDNN's int8 GEMM
    where it has another int8 dot product, its int16-pair kernel on x86 without one; a forced
    setting is taken as it is."""
    import platform

    import modernbert_kernels.int8 as int8

    monkeypatch.delenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", raising=False)
    if amx_int8_runs():
        assert int8.cpu_int8_gemm("cpu") == "amx"
    elif int8.cpu_has_int8_dot_product() and int8.cpu_int8_gemm_is_exact():
        assert int8.cpu_int8_gemm("cpu") == "int8"
    elif platform.machine() in ("x86_64", "AMD64"):
        assert int8.cpu_int8_gemm("cpu") == "int16"
    for forced in ("amx", "int16", "float") if amx_int8_runs() else ("int16", "float"):
        monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", forced)
        assert int8.cpu_int8_gemm("cpu") == forced


@CPU_EXTENSION
def test_int8_gemm_exactness_is_measured():
    """The probe behind the choice: exact where oneDNN takes VNNI / AMX, not exact when its ISA is
    capped below them (as on AVX2-only CPUs); the C++ backend then runs its int16-pair GEMM (its AMX
    kernel, which does not go through oneDNN, where the CPU has AMX) and the torch backend the float
    one."""
    code = """
import torch
from modernbert_kernels import int8
from modernbert_kernels.int8 import int8_linear
assert not int8.cpu_int8_gemm_is_exact() and int8.cpu_int8_gemm() == "float"
assert int8.cpu_int8_gemm("cpu") == EXPECTED, int8.cpu_int8_gemm("cpu")
x_q = torch.full((40, 64), 127, dtype=torch.int8)
for backend in ("cpu", "torch"):
    out = int8_linear(x_q, torch.ones(40), x_q[:24], torch.ones(24), out_dtype=torch.float32, backend=backend)
    assert torch.equal(out, torch.full((40, 24), 127.0 * 127 * 64)), backend
"""
    import modernbert_kernels.int8 as int8

    if "ONEDNN_MAX_CPU_ISA" not in os.environ:  # oneDNN takes what the CPU has
        assert int8.cpu_int8_gemm_is_exact() == int8.cpu_has_int8_dot_product()
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    env.pop("MODERNBERT_KERNELS_CPU_INT8_GEMM", None)
    code = code.replace("EXPECTED", repr("amx" if amx_int8_runs() else "int16"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("backend", NATIVE_CPU_BACKENDS)
def test_a_bad_cpu_gemm_setting_is_refused(backend, monkeypatch):
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_INT8_GEMM", "fast")
    x_q, w_q = random_int8(4, 32, seed=1), random_int8(8, 32, seed=2)
    with pytest.raises((ValueError, RuntimeError), match="MODERNBERT_KERNELS_CPU_INT8_GEMM must be auto, amx, int8, int16 or float"):
        int8_linear(x_q, torch.ones(4), w_q, torch.ones(8), backend=backend)


@CPU_EXTENSION
def test_quantize_bf16_input_with_layernorm():
    generator = torch.Generator().manual_seed(10)
    x = (torch.randn(64, 200, generator=generator) * 3).bfloat16()
    weight = torch.rand(200, generator=generator) + 0.5
    q, scale = quantize_per_token(x, norm_weight=weight, backend="cpu")
    q_torch, scale_torch = quantize_per_token(x, norm_weight=weight, backend="torch")
    torch.testing.assert_close(scale, scale_torch, rtol=1e-5, atol=0)
    assert (q.int() - q_torch.int()).abs().max() <= 1


@CPU_EXTENSION
def test_native_int8_op_errors_are_clear():
    with pytest.raises(RuntimeError, match="share K"):
        torch.ops.modernbert_kernels.int8_linear_native(
            torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8),
            None, "none", torch.float32,
        )
    too_long = torch.zeros(1, 2**17 + 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="could overflow"):
        torch.ops.modernbert_kernels.int8_linear_native(too_long, torch.ones(1), too_long, torch.ones(1), None, "none",
                                                        torch.float32)


@pytest.mark.gpu
@CUDA_EXTENSION
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


@pytest.mark.gpu
@CUDA_EXTENSION
def test_cuda_quantize_matches_reference():
    x = torch.randn(40, 96, device="cuda") * 3
    x[3] = 0.0
    q, scale = quantize_per_token(x, backend="cuda")
    ref_q, ref_scale = quantize_per_row_reference(x.cpu())
    assert_rounds_as_float64(q.cpu(), x.cpu(), ref_q, ref_scale)
    torch.testing.assert_close(scale.cpu().double(), ref_scale, rtol=1e-6, atol=0)
