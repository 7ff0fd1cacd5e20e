"""CPU linears on the measured-fastest GEMM (modernbert_kernels.cpu_linear) against float64."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modernbert_kernels import cpu_linear, native
from modernbert_kernels.cpu_linear import Linear

# Relative error (max |error| / max |reference|) against the float64 linear: fp32 sums of up to
# ~1000 products; bf16 inputs are exact in fp32, the output is rounded to bf16 (2^-8).
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3}
# (leading dims, in_features, out_features): the encoder's 2-D token streams, 3-D batches, one row,
# sizes that are not multiples of any vector width.
SHAPES = [((64,), 768, 96), ((3, 37), 48, 80), ((1,), 130, 7), ((257,), 32, 1152)]

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_available(torch.float32), reason="no oneDNN here")


def skip_unless_runs(gemm, dtype):
    runs = "onednn_packed" if (gemm, dtype) == ("onednn_packed_fp32", torch.float32) else gemm
    if runs not in cpu_linear.available_gemms(dtype):
        pytest.skip(f"{gemm} does not run {dtype} here")


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def random_linear(in_features, out_features, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():  # biases as large as the products, so a dropped bias fails
        linear.weight.normal_()
        if bias:
            linear.bias.normal_().mul_(in_features**0.5)
    return linear.to(dtype)


def float64_linear(linear, x):
    bias = linear.bias.double() if linear.bias is not None else None
    return F.linear(x.double(), linear.weight.double(), bias)


@pytest.mark.parametrize("gemm", cpu_linear.GEMMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("leading, in_features, out_features", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_inference_matches_float64(gemm, dtype, leading, in_features, out_features, bias, monkeypatch):
    skip_unless_runs(gemm, dtype)
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", gemm)
    linear = random_linear(in_features, out_features, dtype, bias, seed=len(leading) + in_features)
    x = torch.randn(*leading, in_features).to(dtype)
    with torch.no_grad():
        out = linear(x)
    assert out.shape == (*leading, out_features) and out.dtype == dtype
    assert relative_error(out, float64_linear(linear, x)) < TOLERANCE[dtype]


# A gated projection rounds twice more than a linear in bf16 (the activated half, then the product).
GATED_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
FLOAT64_ACTIVATIONS = {
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu,
}


@pytest.mark.parametrize("gemm", cpu_linear.GEMMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", sorted(FLOAT64_ACTIVATIONS))
@pytest.mark.parametrize("leading, in_features, half", [((64,), 768, 96), ((3, 37), 48, 40), ((1,), 130, 7)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_gated_matches_float64(gemm, dtype, activation, leading, in_features, half, bias, monkeypatch):
    """act(x A^T + a) * (x G^T + g) over the weight's two halves, on either GEMM (the packed one
    computes the activation and the product as oneDNN post-ops)."""
    skip_unless_runs(gemm, dtype)
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", gemm)
    linear = random_linear(in_features, 2 * half, dtype, bias, seed=in_features + half)
    x = torch.randn(*leading, in_features).to(dtype)
    with torch.no_grad():
        out = linear(x, gated=activation)
    activated, gate = float64_linear(linear, x).chunk(2, dim=-1)
    expected = FLOAT64_ACTIVATIONS[activation](activated) * gate
    assert out.shape == (*leading, half) and out.dtype == dtype
    assert relative_error(out, expected) < GATED_TOLERANCE[dtype]


@pytest.mark.parametrize("gemm", cpu_linear.GEMMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("leading, in_features, out_features", SHAPES)
@pytest.mark.parametrize("residual_layout", ["contiguous", "strided"])
def test_residual_matches_float64(gemm, dtype, leading, in_features, out_features, residual_layout, monkeypatch):
    """residual + x A^T + b on every GEMM (the packed bf16 one adds it in its epilogue), from a
    contiguous or a strided residual, which is left as it was."""
    skip_unless_runs(gemm, dtype)
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", gemm)
    linear = random_linear(in_features, out_features, dtype, seed=in_features + out_features)
    x = torch.randn(*leading, in_features).to(dtype)
    # As large as the products, so a dropped residual fails.
    residual = (torch.randn(*leading, 2 * out_features) * in_features**0.5).to(dtype)
    residual = residual[..., ::2] if residual_layout == "strided" else residual[..., :out_features].contiguous()
    before = residual.clone()
    with torch.no_grad():
        out = linear(x, residual=residual)
    assert out.shape == (*leading, out_features) and out.dtype == dtype
    assert relative_error(out, float64_linear(linear, x) + residual.double()) < TOLERANCE[dtype]
    assert torch.equal(residual, before)


@pytest.mark.parametrize("gemm", cpu_linear.GEMMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("leading", [(0,), (2, 0)])
def test_residual_on_no_rows(gemm, dtype, leading, monkeypatch):
    skip_unless_runs(gemm, dtype)
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", gemm)
    linear = random_linear(16, 8, dtype)
    with torch.no_grad():
        out = linear(torch.randn(*leading, 16).to(dtype), residual=torch.randn(*leading, 8).to(dtype))
    assert out.shape == (*leading, 8) and out.dtype == dtype


def test_residual_of_the_wrong_shape_is_refused():
    linear = random_linear(16, 8, torch.float32)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"residual \(3, 16\) must have the output's shape \(3, 8\)"):
            linear(torch.randn(3, 16), residual=torch.randn(3, 16))
        with pytest.raises(ValueError, match="a gated projection takes no residual"):
            linear(torch.randn(3, 16), gated="gelu", residual=torch.randn(3, 4))


def test_gated_refuses_an_unknown_activation():
    with torch.no_grad(), pytest.raises(ValueError, match="unsupported gated activation 'tanh'"):
        random_linear(16, 8, torch.float32)(torch.randn(3, 16), gated="tanh")


@needs_onednn
def test_packed_weight_follows_the_weight(monkeypatch):
    """The packed copy is made again after an in-place change, a load_state_dict and a dtype change."""
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "onednn_packed")
    linear = random_linear(64, 48, torch.float32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        linear(x)
        linear.weight.mul_(-2.0)
        assert relative_error(linear(x), float64_linear(linear, x)) < TOLERANCE[torch.float32]
        linear.load_state_dict(random_linear(64, 48, torch.float32, seed=9).state_dict())
        assert relative_error(linear(x), float64_linear(linear, x)) < TOLERANCE[torch.float32]
        if not cpu_linear.onednn_available(torch.bfloat16):
            return
        linear.to(torch.bfloat16)
        x16 = x.bfloat16()
        assert relative_error(linear(x16), float64_linear(linear, x16)) < TOLERANCE[torch.bfloat16]
    assert set(linear.state_dict()) == {"weight", "bias"}  # the packed copy is not state


@needs_onednn
@pytest.mark.skipif(not native.cpu_status()[0], reason="the streamed GEMM needs the C++ CPU kernels")
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_a_released_streamed_copy_is_packed_again_when_asked(gated, monkeypatch):
    """The streamed copy a caller packed to time it (native_operands(measured=False)) and then did
    not keep (release_streamed_copy) is gone from the cache, and made again, the same, when asked;
    a new weight version has none until asked."""
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "auto")
    monkeypatch.setattr(cpu_linear, "_measured_gemm", lambda *args: "aten")
    linear = random_linear(64, 48, torch.float32)
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert not linear.has_streamed_copy(gated) and linear.native_operands(x, gated) is None
        first = linear.native_operands(x, gated, measured=False)
        assert linear.has_streamed_copy(gated) and not linear.has_streamed_copy(not gated)
        linear.release_streamed_copy(gated)
        assert not linear.has_streamed_copy(gated)
        again = linear.native_operands(x, gated, measured=False)
        assert again.weights[0] is not first.weights[0] and torch.equal(again.weights[0], first.weights[0])
        linear.weight.mul_(2.0)
        assert not linear.has_streamed_copy(gated)
        assert linear.native_operands(torch.randn(4096, 64), gated, measured=False) is None  # not timed there


def test_training_takes_autograd(monkeypatch):
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "onednn_packed")
    linear = random_linear(32, 16, torch.float32)
    x = torch.randn(7, 32, dtype=torch.float64, requires_grad=True)
    reference = F.linear(x, linear.weight.double(), linear.bias.double())
    reference.square().sum().backward()
    expected_dx, x.grad = x.grad, None
    linear(x.float()).square().sum().backward()  # x.float() keeps the graph back to x
    assert relative_error(x.grad, expected_dx) < 1e-5
    assert linear.weight.grad is not None and linear.bias.grad is not None


def test_wrong_dtype_is_refused():
    linear = random_linear(16, 8, torch.float32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        linear(torch.randn(3, 16, dtype=torch.float64))


@pytest.fixture
def fresh_choices():
    """Choices made under a faked timer are forgotten after the test, so no other test runs them."""
    cpu_linear._measured_gemm.cache_clear()
    yield
    cpu_linear._measured_gemm.cache_clear()


def test_gemm_choice_is_the_measured_fastest(monkeypatch, fresh_choices):
    monkeypatch.setattr(cpu_linear, "available_gemms", lambda dtype: cpu_linear.GEMMS)
    for times, chosen in (({"aten": [2.0, 2.0, 0.5], "onednn_packed": [1.0, 1.0, 3.0]}, "onednn_packed"),  # medians
                          ({"aten": [1.0], "onednn_packed": [2.0]}, "aten"),
                          ({"aten": [3.0], "onednn_packed": [2.0], "onednn_packed_fp32": [1.0]}, "onednn_packed_fp32")):
        cpu_linear._measured_gemm.cache_clear()
        monkeypatch.setattr(cpu_linear, "time_gemms", lambda dtype, shapes, tokens, times=times: times)
        assert cpu_linear.cpu_gemm(torch.bfloat16, 768, 2304) == chosen
    timed = []
    monkeypatch.setattr(cpu_linear, "time_gemms", lambda dtype, shapes, tokens: timed.append(shapes) or {"aten": [1.0]})
    cpu_linear.cpu_gemm(torch.float32, 64, 32)
    cpu_linear.cpu_gemm(torch.float32, 64, 32)
    assert timed == [((64, 32),)]  # measured once per shape
    assert cpu_linear.cpu_gemm(torch.float16, 64, 32) == "aten"  # no packed fp16 path: never timed
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "aten")
    assert cpu_linear.cpu_gemm(torch.float32, 768, 2304) == "aten"
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "onednn_packed_fp32")
    assert cpu_linear.cpu_gemm(torch.bfloat16, 768, 2304) == "onednn_packed_fp32"
    assert cpu_linear.cpu_gemm(torch.float32, 768, 2304) == "onednn_packed"  # fp32 widened is the packed fp32 GEMM
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="must be auto, aten, onednn_packed, onednn_packed_fp32, streamed, not 'fast'"):
        cpu_linear.cpu_gemm(torch.float32, 768, 2304)


def test_gemm_choice_follows_the_token_count(monkeypatch, fresh_choices):
    """Each token regime keeps the GEMM measured fastest at its count (1, 16 or 2048 tokens), and a
    call takes the regime whose count is nearest its own on a log scale (bounds 4 and 181.02)."""
    monkeypatch.setattr(cpu_linear, "available_gemms", lambda dtype: ("aten", "onednn_packed"))
    winners = {1: "aten", 16: "onednn_packed", 2048: "aten"}
    timed = []
    monkeypatch.setattr(cpu_linear, "time_gemms", lambda dtype, shapes, tokens: timed.append(tokens) or {
        gemm: [0.5 if gemm == winners[tokens] else 1.0] for gemm in ("aten", "onednn_packed")})
    calls = {1: "aten", 3: "aten", 4: "onednn_packed", 16: "onednn_packed", 181: "onednn_packed", 182: "aten",
             2048: "aten", 100_000: "aten"}
    assert {tokens: cpu_linear.cpu_gemm(torch.float32, 64, 32, tokens) for tokens in calls} == calls
    assert sorted(timed) == [1, 16, 2048]  # each regime measured once
    linear = cpu_linear.Linear(64, 32)
    with torch.no_grad():  # a Linear asks for its input's token count: 2 x 8 = 16 tokens, then 1
        assert linear._gemm(torch.randn(2, 8, 64)) == "onednn_packed"
        assert linear._gemm(torch.randn(1, 64)) is None


def test_available_gemms():
    fp32_packs = cpu_linear.onednn_available(torch.float32)
    streamed = {"streamed"} if native.cpu_status()[0] else set()
    assert set(cpu_linear.available_gemms(torch.float32)) == {"aten"} | ({"onednn_packed"} if fp32_packs else set()) | streamed
    bf16 = {"aten"} | ({"onednn_packed"} if cpu_linear.onednn_available(torch.bfloat16) else set()) | streamed
    assert set(cpu_linear.available_gemms(torch.bfloat16)) == bf16 | ({"onednn_packed_fp32"} if fp32_packs else set())
    assert cpu_linear.available_gemms(torch.float16) == ("aten",)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_timing_measures_every_gemm(dtype):
    """Every GEMM that runs here is timed at a few tokens; at the compute-bound count the streamed
    one is not (nor where it cannot hold the shape: bf16 with an odd K)."""
    times = cpu_linear.time_gemms(dtype, shapes=((32, 48),), tokens=16, rounds=2)
    assert set(times) == set(cpu_linear.available_gemms(dtype))
    assert all(len(samples) == 2 and min(samples) > 0 for samples in times.values())
    others = set(cpu_linear.available_gemms(dtype)) - {"streamed"}
    assert set(cpu_linear.time_gemms(dtype, shapes=((32, 48),), tokens=cpu_linear.TIMING_TOKENS, rounds=1)) == others
    odd = set(cpu_linear.time_gemms(dtype, shapes=((33, 48),), tokens=16, rounds=1))
    assert odd == (others if dtype == torch.bfloat16 else set(cpu_linear.available_gemms(dtype)))


def test_bf16_on_a_cpu_onednn_refuses_it_for(tmp_path):
    """Where oneDNN's bf16 inner product does not run (AVX2-only CPUs, emulated here by capping
    oneDNN's ISA and this library's kernels), bf16 linears choose between aten, the packed fp32
    GEMM and the streamed one (bf16 widened in registers), all right; forcing the packed bf16 GEMM
    says why it cannot; fp32 still packs; bf16 is not counted as faster."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, torch\n"
        "from modernbert_kernels import cpu_linear, native\n"
        "from modernbert_kernels.cpu_linear import Linear\n"
        "assert not cpu_linear.onednn_available(torch.bfloat16)\n"
        "assert not cpu_linear.cpu_has_bf16()  # whatever the CPU has: bf16 is converted to fp32 here\n"
        "fp32_packs = cpu_linear.onednn_available(torch.float32)\n"
        "streamed = ('streamed',) if native.cpu_status()[0] else ()\n"
        "assert native.CPU_ISA in (None, 'avx2')\n"
        "assert cpu_linear.available_gemms(torch.bfloat16) == ('aten', 'onednn_packed_fp32')[:1 + fp32_packs] + streamed\n"
        "assert cpu_linear.cpu_gemm(torch.bfloat16, 64, 48) in cpu_linear.available_gemms(torch.bfloat16)\n"
        "linear = Linear(64, 48).bfloat16()\n"
        "x = torch.randn(5, 64).bfloat16()\n"
        "expected = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())\n"
        "for gemm in cpu_linear.available_gemms(torch.bfloat16):\n"
        "    os.environ['MODERNBERT_KERNELS_CPU_GEMM'] = gemm\n"
        "    with torch.no_grad():\n"
        "        out = linear(x)\n"
        "        gated = linear(x, gated='gelu')\n"
        "    assert out.dtype == gated.dtype == torch.bfloat16, gemm\n"
        "    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 8e-3, gemm\n"
        "    assert gated.shape == (5, 24)\n"
        "os.environ['MODERNBERT_KERNELS_CPU_GEMM'] = 'onednn_packed'\n"
        "try:\n"
        "    cpu_linear.cpu_gemm(torch.bfloat16, 64, 48)\n"
        "except RuntimeError as error:\n"
        "    assert 'does not run torch.bfloat16' in str(error)\n"
        "else:\n"
        "    raise AssertionError('forcing an unsupported packed GEMM went through')\n"
        "print('fp32', fp32_packs)\n"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", MODERNBERT_KERNELS_CPU_ISA="avx2")
    env.pop("MODERNBERT_KERNELS_CPU_GEMM", None)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"fp32 {cpu_linear.onednn_available(torch.float32)}"
