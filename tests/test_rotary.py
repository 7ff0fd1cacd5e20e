"""rotary_embedding against the float64 reference: every backend, dtype and stride case, in place
and not, gradients, and refused input."""

import pytest
import torch
from benchmarks import gpu_cases
from helpers import CPU_BACKENDS, DTYPES, GPU_BACKENDS, TOLERANCES, relative_error

from modernbert_kernels import rotary_embedding
from modernbert_kernels.reference import rotary_embedding_reference
from modernbert_kernels.rotary import _rotary_inplace_op, _rotary_op, _rotate

# (tokens, heads, head_dim): ModernBERT's 64, the other supported widths, and a half (20) that is
# not a multiple of any vector width, so the C++ tails and Triton's masks run.
SHAPES = [(37, 5, 64), (16, 2, 32), (9, 3, 128), (21, 4, 40)]


def qkv_and_angles(tokens, heads, head_dim, dtype, seed=0):
    """A fused qkv [tokens, 3, heads, head_dim] and cos / sin of random angles."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=generator).to(dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 100.0
    return qkv, angles.cos(), angles.sin()


def skip_bf16_in_interpreter(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_place_matches_reference(backend, shape, dtype, poison_allocations):
    skip_bf16_in_interpreter(backend, dtype)
    qkv, cos, sin = qkv_and_angles(*shape, dtype)
    before = qkv.clone()
    out = rotary_embedding(qkv[:, :2], cos, sin, backend=backend)  # strided: a slice of qkv
    assert out.dtype == dtype and out.shape == qkv[:, :2].shape
    assert relative_error(out, rotary_embedding_reference(qkv[:, :2], cos, sin)) <= TOLERANCES[dtype]
    assert torch.equal(qkv, before)  # the input is left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_turns_q_and_k_and_nothing_else(backend, shape, dtype):
    skip_bf16_in_interpreter(backend, dtype)
    qkv, cos, sin = qkv_and_angles(*shape, dtype)
    expected = rotary_embedding_reference(qkv[:, :2], cos, sin)
    v = qkv[:, 2].clone()
    returned = rotary_embedding(qkv[:, :2], cos, sin, inplace=True, backend=backend)
    assert returned.data_ptr() == qkv.data_ptr()
    assert relative_error(qkv[:, :2], expected) <= TOLERANCES[dtype]
    assert torch.equal(qkv[:, 2], v)  # v, between the rotated rows, is untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_into_a_poisoned_output_with_other_strides(backend):
    """out need not share x's strides: x a strided slice, out a fresh NaN-filled tensor."""
    qkv, cos, sin = qkv_and_angles(33, 4, 64, torch.float32, seed=3)
    x = qkv[:, :2].view(33, 8, 64)
    out = torch.full((33, 8, 64), float("nan"))
    _rotate(x, cos, sin, out, backend)
    assert relative_error(out, rotary_embedding_reference(x, cos, sin)) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_is_the_inverse_rotation(backend):
    qkv, cos, sin = qkv_and_angles(19, 3, 64, torch.float32, seed=4)
    x = qkv[:, :2].clone().requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    (rotary_embedding(x, cos, sin, backend=backend) * weights).sum().backward()
    x64 = qkv[:, :2].double().requires_grad_()
    (rotary_embedding_reference(x64, cos, sin) * weights.double()).sum().backward()
    assert relative_error(x.grad, x64.grad) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("tokens, heads", [(0, 3), (5, 0)], ids=["no_tokens", "no_heads"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_input(backend, tokens, heads):
    """An empty q / k (no tokens, or no heads in the middle) is rotated to an empty result, in place
    or not, with an empty gradient: nothing reaches a kernel."""
    qkv, cos, sin = qkv_and_angles(tokens, heads, 64, torch.float32)
    x = qkv[:, :2].clone().requires_grad_()
    out = rotary_embedding(x, cos, sin, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert rotary_embedding(qkv[:, :2], cos, sin, inplace=True, backend=backend).shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    qkv, cos, sin = qkv_and_angles(12, 2, 32, torch.float32, seed=6)
    rows = qkv[:, :2].reshape(12, 4, 32)
    torch.library.opcheck(_rotary_op, (rows.clone().requires_grad_(), cos, sin, backend))
    torch.library.opcheck(_rotary_inplace_op, (rows.clone(), cos, sin, backend))


def test_torch_compile_in_place_and_out_of_place():
    qkv, cos, sin = qkv_and_angles(24, 3, 64, torch.float32, seed=7)

    def turn_both(t):
        rotated = rotary_embedding(t[:, :1], cos, sin)
        rotary_embedding(t[:, 1:2], cos, sin, inplace=True)
        return rotated

    eager = qkv.clone()
    expected = turn_both(eager)
    compiled_input = qkv.clone()
    got = torch.compile(turn_both, fullgraph=True)(compiled_input)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_input, eager)


def test_refuses_bad_input():
    qkv, cos, sin = qkv_and_angles(8, 2, 64, torch.float32)
    x = qkv[:, :2]
    with pytest.raises(ValueError, match="cos must be"):
        rotary_embedding(x, cos[:, :16], sin)
    with pytest.raises(ValueError, match="sin must be"):
        rotary_embedding(x, cos, sin[:7])
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary_embedding(torch.randn(8, 2, 63), cos, sin)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        rotary_embedding(torch.ones(8, 2, 64, dtype=torch.int32), cos, sin)
    with pytest.raises(TypeError, match="cos must be a floating-point"):
        rotary_embedding(x, cos.long(), sin)
    with pytest.raises(ValueError, match="backend must be one of"):
        rotary_embedding(x, cos, sin, backend="reference")
    with pytest.raises(ValueError, match="cannot record a gradient"):
        rotary_embedding(x.clone().requires_grad_(), cos, sin, inplace=True)
    # [tokens, 2, heads, dim] taken every other slot of 4: the middle dims do not merge into one.
    spread = torch.randn(8, 4, 2, 64)[:, ::2]
    with pytest.raises(ValueError, match="merge into one"):
        rotary_embedding(spread, cos, sin, inplace=True)
    # Out of place copes with it.
    expected = rotary_embedding_reference(spread, cos, sin)
    assert relative_error(rotary_embedding(spread, cos, sin), expected) <= TOLERANCES[torch.float32]


@pytest.mark.skipif(not hasattr(torch.ops.modernbert_kernels, "rotary_embedding_native"), reason="extension not built")
def test_native_op_checks_its_arguments():
    x = torch.randn(8, 4, 64)
    good = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        torch.ops.modernbert_kernels.rotary_embedding_native(x, torch.randn(8, 31), good, x)
    with pytest.raises(RuntimeError, match="out must match"):
        torch.ops.modernbert_kernels.rotary_embedding_native(x, good, good, torch.empty(8, 4, 62))
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.modernbert_kernels.rotary_embedding_native(torch.randn(8, 64, 4).transpose(1, 2), good, good, x)


@pytest.mark.gpu
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
