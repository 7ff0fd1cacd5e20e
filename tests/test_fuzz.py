"""Differential fuzzing with hypothesis: every op on every backend that runs here, on random problems,
against the float64 references. Marked `fuzz` (not in the default run; CI runs `pytest -m fuzz` as
its own step and prints its time).

Examples per op and backend: EXAMPLES on the C++ (`cpu`) and PyTorch (`torch`) backends;
INTERPRETER_EXAMPLES[op] for Triton in its interpreter, which runs a kernel about a thousand times
slower: fewer attention examples (forward and both backward passes each), up to 144 tokens and 2
heads. Examples are derandomized: a CI run is reproducible, and a failure prints the example to
paste into a regression test. Tolerances are TOLERANCES (helpers.py),
stated once per dtype.
"""

import math

import pytest
import torch
from helpers import NATIVE_CPU_BACKENDS, TOLERANCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modernbert_kernels import block_sparse_attention, int8_linear, layouts, quantize_per_token, rotary_embedding
from modernbert_kernels.int8 import quantize_per_channel
from modernbert_kernels.reference import (
    block_sparse_attention_reference,
    int8_linear_reference,
    quantize_per_row_reference,
    rotary_embedding_reference,
)

pytestmark = pytest.mark.fuzz

EXAMPLES = 1000
INTERPRETER_EXAMPLES = {"attention": 60, "int8_linear": 1000, "quantize": 500, "rotary": 1000}
INTERPRETED = [pytest.param("triton", marks=pytest.mark.interpreter)]
SEEDS = st.integers(0, 2**31 - 1)
# Relative error of the int8 epilogue against float64, per output dtype (as test_int8.py).
EPILOGUE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def close(actual, expected, tolerance) -> bool:
    """max |actual - expected| within tolerance x the reference's magnitude, or x 1 (the scale of
    the unit-variance inputs) where the reference is near zero: a one-token sequence's dq is
    exactly 0 in float64 and rounding noise in fp32."""
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    return (actual.double() - expected).abs().max().item() <= tolerance * scale


def fuzz_test(strategy, check, backends, examples):
    """A test of ``check(backend, example)`` over ``strategy(backend)``'s examples, per backend."""

    @pytest.mark.parametrize("backend", backends)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(data=st.data())
    def test(backend, data):
        check(backend, data.draw(strategy(backend)))

    return test


def dtypes_for(backend):
    # The interpreter runs fp32 and fp16; fp16 matmul on this CPU is slow, so the C++ path is
    # the one that sees 16-bit inputs most; bf16 runs natively on cpu / torch.
    if backend == "triton":
        return st.sampled_from([torch.float32, torch.float16])
    return st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])


@st.composite
def attention_problems(draw, backend):
    block = draw(st.sampled_from([16, 32, 64]))
    # In the interpreter up to 144 tokens (three blocks of 64, the last partial) and two heads: its
    # cost grows with the tiles visited, and the third head or fourth block found nothing new (#20).
    seq_len = draw(st.integers(1, 160 if backend != "triton" else 144))
    heads = draw(st.integers(1, 3 if backend != "triton" else 2))
    # 256 only outside the interpreter, where it would double the cost of every case drawn, and one
    # draw in ten there: it costs four times 64's, and its kernels differ from 128's only in size.
    head_dim = draw(st.sampled_from([32, 64, 128] if backend == "triton" else [32, 64, 128] * 3 + [256]))
    num_blocks = -(-seq_len // block)
    layout_heads = draw(st.sampled_from([1, heads]))
    density = draw(st.floats(0.1, 1.0))
    generator = torch.Generator().manual_seed(draw(SEEDS))
    mask = torch.rand(layout_heads, num_blocks, num_blocks, generator=generator) < density
    layout = layouts.from_block_mask(mask, block)
    window = draw(st.one_of(st.none(), st.integers(0, seq_len + 8)))
    causal = draw(st.booleans())
    mode = draw(st.sampled_from(["padded", "key_padding", "varlen"]))
    dtype = draw(dtypes_for(backend))
    extra = {}
    if mode == "varlen":
        lengths = draw(st.lists(st.integers(0, seq_len), min_size=1, max_size=4))
        lengths[0] = seq_len  # the layout's length is the longest sequence's
        extra["cu_seqlens"] = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        shape = (sum(lengths), heads, head_dim)
    else:
        batch = draw(st.integers(1, 2))
        shape = (batch, heads, seq_len, head_dim)
        if mode == "key_padding":
            extra["key_padding_mask"] = torch.rand(batch, seq_len, generator=generator) < 0.8
    if draw(st.booleans()):  # per-example global tokens, anywhere (often none in an example)
        extra["global_tokens"] = torch.rand(shape[:1] if mode == "varlen" else (shape[0], seq_len),
                                            generator=generator) < draw(st.sampled_from([0.02, 0.1, 0.3]))
    elif draw(st.booleans()):  # logit soft-capping: not with global tokens
        extra["softcap"] = draw(st.sampled_from([0.3, 1.0, 30.0]))
    q, k, v, dout = (torch.randn(shape, generator=generator).to(dtype) for _ in range(4))
    return dict(q=q, k=k, v=v, dout=dout, layout=layout, window=window, causal=causal, extra=extra)


def check_attention(backend, problem):
    q, k, v, dout = problem["q"], problem["k"], problem["v"], problem["dout"]
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, problem["layout"], window=problem["window"], causal=problem["causal"],
                                 backend=backend, **problem["extra"])
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, problem["layout"], window=problem["window"],
                                           causal=problem["causal"], **problem["extra"])
    ref.backward(dout.double())
    for name, actual, expected in [("out", out, ref)] + [(f"d{n}", t.grad, r.grad)
                                                         for n, t, r in zip("qkv", inputs, ref_inputs)]:
        if expected.numel() == 0:
            continue
        assert actual.dtype == q.dtype and not actual.isnan().any(), name
        # Gradients go through the rounded output (delta = rowsum(dO * O)): twice the output's
        # tolerance in 16 bits (bf16 dq at 4 tokens: 0.012 off at magnitude 0.83).
        tolerance = TOLERANCES[q.dtype] * (1 if name == "out" or q.dtype == torch.float32 else 2)
        assert close(actual, expected, tolerance), (name, (actual.double() - expected).abs().max().item())


def int8_problems(backend):
    """(m, n, k, activation, out_dtype, with_bias, with_residual, seed): k a multiple of 16, not always
    of 32."""
    out_dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if backend != "triton" else [])
    return st.tuples(st.integers(1, 70), st.integers(1, 40).map(lambda half: 2 * half),
                     st.integers(1, 12).map(lambda blocks: 16 * blocks),
                     st.sampled_from([None, "gelu", "gelu_tanh", "geglu"]), st.sampled_from(out_dtypes),
                     st.booleans(), st.booleans(), SEEDS)


def check_int8_linear(backend, problem):
    m, n, k, activation, out_dtype, with_bias, with_residual, seed = problem
    generator = torch.Generator().manual_seed(seed)
    x_q, x_scale = quantize_per_token(torch.randn(m, k, generator=generator), backend="torch")
    w_q, w_scale = quantize_per_channel(torch.randn(n, k, generator=generator))
    bias = torch.randn(n, generator=generator) if with_bias else None
    cols = n // 2 if activation == "geglu" else n
    residual = torch.randn(m, cols, generator=generator).to(out_dtype) if with_residual else None
    out = int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype=out_dtype, backend=backend,
                      residual=residual)
    expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation, residual)
    assert out.dtype == out_dtype and out.shape == expected.shape
    assert close(out, expected, EPILOGUE_TOLERANCE[out_dtype])


def quantize_problems(backend):
    """(m, k, with LayerNorm and smoothing, magnitude, seed)."""
    return st.tuples(st.integers(1, 50), st.integers(1, 300), st.booleans(), st.sampled_from([1e-3, 1.0, 1e3]), SEEDS)


def check_quantize(backend, problem):
    m, k, fused, magnitude, seed = problem
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator) * magnitude
    if not fused:
        q, scale = quantize_per_token(x, backend=backend)
        ref_q, ref_scale = quantize_per_row_reference(x)
        torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
        # x / scale in fp32 can land exactly on a .5 that float64 puts just below (seed 4404:
        # 93.5 vs 93.49999998): off by one there, and within half a step of x everywhere.
        assert (q.int() - ref_q.int()).abs().max() <= 1
        error = (x.double() - q.double() * scale.double()[:, None]).abs()
        assert (error <= scale.double()[:, None] / 2 * (1 + 1e-5)).all()
        return
    weight = torch.rand(k, generator=generator) + 0.5
    smooth = torch.rand(k, generator=generator) + 0.5
    q, scale = quantize_per_token(x, norm_weight=weight, eps=1e-5, smooth=smooth, backend=backend)
    normed = torch.nn.functional.layer_norm(x.double(), (k,), weight.double(), None, 1e-5) * smooth.double()
    ref_q, ref_scale = quantize_per_row_reference(normed)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-4, atol=1e-7)
    # fp32 LayerNorm may land a value on the other side of a rounding boundary: off by one at most.
    assert (q.int() - ref_q.int()).abs().max() <= 1


def rotary_problems(backend):
    """(tokens, heads, head_dim, dtype, q and k sliced from a fused qkv, in place, seed)."""
    return st.tuples(st.integers(1, 60), st.integers(1, 4), st.integers(1, 64).map(lambda half: 2 * half),
                     dtypes_for(backend), st.booleans(), st.booleans(), SEEDS)


def check_rotary(backend, problem):
    tokens, heads, head_dim, dtype, strided, inplace, seed = problem
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=generator).to(dtype)
    x = qkv[:, :2] if strided else qkv[:, :2].contiguous()
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 2 * math.pi * 20
    cos, sin = angles.cos(), angles.sin()
    expected = rotary_embedding_reference(x, cos, sin)
    out = rotary_embedding(x, cos, sin, inplace=inplace, backend=backend)
    assert close(out, expected, TOLERANCES[dtype])
    if inplace:
        assert close(x, expected, TOLERANCES[dtype])


test_fuzz_attention_forward_and_backward = fuzz_test(attention_problems, check_attention, NATIVE_CPU_BACKENDS, EXAMPLES)
test_fuzz_int8_linear = fuzz_test(int8_problems, check_int8_linear, NATIVE_CPU_BACKENDS, EXAMPLES)
test_fuzz_quantize_per_token = fuzz_test(quantize_problems, check_quantize, NATIVE_CPU_BACKENDS, EXAMPLES)
test_fuzz_rotary = fuzz_test(rotary_problems, check_rotary, NATIVE_CPU_BACKENDS, EXAMPLES)
test_fuzz_attention_forward_and_backward_interpreted = fuzz_test(
    attention_problems, check_attention, INTERPRETED, INTERPRETER_EXAMPLES["attention"])
test_fuzz_int8_linear_interpreted = fuzz_test(int8_problems, check_int8_linear, INTERPRETED,
                                              INTERPRETER_EXAMPLES["int8_linear"])
test_fuzz_quantize_per_token_interpreted = fuzz_test(quantize_problems, check_quantize, INTERPRETED,
                                                     INTERPRETER_EXAMPLES["quantize"])
test_fuzz_rotary_interpreted = fuzz_test(rotary_problems, check_rotary, INTERPRETED, INTERPRETER_EXAMPLES["rotary"])
