"""The op's contract: bad input is refused with a clear error; torch.library and torch.compile work."""

import pytest
import torch

from helpers import CPU_BACKENDS
from modernbert_kernels import block_sparse_attention, layouts
from modernbert_kernels.attention import _attention_op
from modernbert_kernels.backends import default_backend

LAYOUT = layouts.sliding_window(128, 32, 32)


def qkv(shape=(2, 2, 128, 64), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def cu(*lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize(
    "make_call, error, message",
    [
        (lambda q, k, v: (q, k[:, :, :64], v, LAYOUT), ValueError, "k has shape"),
        (lambda q, k, v: (q, k.half(), v, LAYOUT), TypeError, "k has dtype"),
        (lambda q, k, v: (q.double(), k.double(), v.double(), LAYOUT), TypeError, "q has dtype"),
        (lambda q, k, v: (q[:, :, :100, None], k, v, LAYOUT), ValueError, "k has shape"),
        (lambda q, k, v: (q, k, v, layouts.bigbird(128, 32, 32, 1, 32, num_heads=3)), ValueError, "layout has 3 heads"),
        (lambda q, k, v: (q, k, v, layouts.sliding_window(96, 32, 32)), ValueError, "layout covers 96 tokens"),
        (lambda q, k, v: (q, k, v, "sliding"), TypeError, "layout must be"),
    ],
)
def test_bad_tensors(make_call, error, message):
    with pytest.raises(error, match=message):
        block_sparse_attention(*make_call(*qkv()))


@pytest.mark.interpreter
def test_bf16_is_refused_in_tritons_interpreter():
    """The interpreter's bf16 dot products are garbage (~8e8 for outputs of magnitude 4): refused,
    not returned."""
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter"):
        block_sparse_attention(q, k, v, LAYOUT, backend="triton")


def test_bad_varlen_and_masks():
    q, k, v = qkv((100, 2, 64))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32"):
        block_sparse_attention(q, k, v, LAYOUT, cu_seqlens=cu(60, 40).long())
    with pytest.raises(ValueError, match="non-decreasing"):
        block_sparse_attention(q, k, v, LAYOUT, cu_seqlens=torch.tensor([0, 70, 60, 100], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at total_tokens=100"):
        block_sparse_attention(q, k, v, LAYOUT, cu_seqlens=cu(60, 30))
    with pytest.raises(ValueError, match="max_seqlen=50"):
        block_sparse_attention(q, k, v, LAYOUT, cu_seqlens=cu(60, 40), max_seqlen=50)
    with pytest.raises(ValueError, match="layout covers 64 tokens"):
        block_sparse_attention(q, k, v, layouts.sliding_window(64, 32, 32), cu_seqlens=cu(70, 30))
    with pytest.raises(ValueError, match="q must be"):
        block_sparse_attention(*qkv(), LAYOUT, cu_seqlens=cu(60, 40))
    q4, k4, v4 = qkv()
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        block_sparse_attention(q4, k4, v4, LAYOUT, key_padding_mask=torch.ones(2, 64, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        block_sparse_attention(q4, k4, v4, LAYOUT, key_padding_mask=torch.ones(2, 128))
    with pytest.raises(ValueError, match="window must be"):
        block_sparse_attention(q4, k4, v4, LAYOUT, window=-3)
    with pytest.raises(TypeError, match="causal must be a bool"):
        block_sparse_attention(q4, k4, v4, LAYOUT, causal=1)
    with pytest.raises(ValueError, match="backend must be"):
        block_sparse_attention(q4, k4, v4, LAYOUT, backend="flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k is on"):
        block_sparse_attention(q, k.cuda(), v, LAYOUT)


def test_device_mismatch_on_meta():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="v is on meta"):
        block_sparse_attention(q, k, v.to("meta"), LAYOUT)


def test_cpu_tensors_default_to_a_cpu_backend():
    from modernbert_kernels import native

    assert default_backend(torch.device("cpu")) == ("cpu" if native.cpu_status()[0] else "torch")


# (varlen sequence lengths, or a padded [batch, heads, seq, dim] shape), by the case they stand for.
DENSE_INPUTS = {"short": (2, 2, 128, 64), "long": (2, 2, 512, 64), "mixed_long": [300, 512],
                "mixed_short": [40, 256]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "with_grad"])
@pytest.mark.parametrize("inputs", DENSE_INPUTS.values(), ids=DENSE_INPUTS.keys())
def test_dense_attention_runs_on_the_kernel_measured_faster(dtype, grad, inputs):
    """With no backend named, dense CPU attention runs in our kernels for the dtypes they were
    measured ahead of PyTorch's fused kernel on this CPU's build (backends.py), except fp32 with
    gradients (PyTorch's fused backward is faster). Where PyTorch's is ahead in bf16 (AMX), it runs
    long sequences of one length only: ours runs sequences of up to 256 tokens and varlen batches of
    mixed lengths (attention.py, _pytorch_dense_is_faster)."""
    from modernbert_kernels import backends, native

    if not native.cpu_status()[0]:
        pytest.skip("the C++ extension is not built: every CPU call takes the torch path")
    varlen = isinstance(inputs, list)
    shape = (sum(inputs), 2, 64) if varlen else inputs
    longest = max(inputs) if varlen else inputs[2]
    q, k, v = (t.to(dtype).requires_grad_(grad) for t in qkv(shape))
    options = dict(cu_seqlens=cu(*inputs), max_seqlen=longest) if varlen else {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        block_sparse_attention(q, k, v, layouts.dense(512, 64), **options)
    names = {event.name for event in profile.events()}
    if dtype == torch.float32:
        ours = dtype in backends.DENSE_FORWARD_IN_OUR_CPU_KERNELS and not grad
    else:
        ours = dtype in backends.DENSE_FORWARD_IN_OUR_CPU_KERNELS or longest <= 256 or varlen
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in names) == (not ours)
    if native.CPU_ISA in ("avx2", "avx512", "avx512_bf16", "amx"):
        assert torch.float32 in backends.DENSE_FORWARD_IN_OUR_CPU_KERNELS
        amx = backends.cpu_capabilities().get("amx_bf16", False)
        assert (torch.bfloat16 in backends.DENSE_FORWARD_IN_OUR_CPU_KERNELS) == (not amx)


EMPTY_SHAPES = {"no_batch": (0, 2, 64, 32), "no_heads": (2, 0, 64, 32), "no_tokens": (2, 2, 0, 32),
                "varlen_no_tokens": (0, 2, 32), "varlen_no_heads": (40, 0, 32)}


@pytest.mark.parametrize("shape", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "reference", None])
def test_empty_inputs_give_empty_outputs_and_gradients(backend, shape):
    """No batch, head or token: empty outputs and gradients on every backend, dense or not (PyTorch's
    fused CPU attention, which dense layouts take, died of SIGFPE with no heads or no tokens)."""
    varlen = len(shape) == 3
    options = dict(cu_seqlens=cu(16, 24) if shape[0] else cu(0, 0)) if varlen else {}
    tokens = shape[0] if varlen else shape[2]
    global_tokens = torch.zeros(shape[0] if varlen else (shape[0], tokens), dtype=torch.bool)
    for layout, extra in ((layouts.dense(64, 32), {}), (layouts.dense(64, 32), dict(causal=True)),
                          (layouts.sliding_window(64, 16, 32), dict(window=16)),
                          (layouts.sliding_window(64, 16, 32), dict(window=16, global_tokens=global_tokens))):
        q, k, v = (t.requires_grad_() for t in qkv(shape))
        out = block_sparse_attention(q, k, v, layout, backend=backend, **options, **extra)
        assert out.shape == q.shape and out.dtype == q.dtype
        out.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


def op_args(backend, varlen, window=(20, 20), softcap=0.0):
    layout = layouts.bigbird(128, 16, 32, 1, 32, num_heads=2)
    if varlen:
        q, k, v = (t.requires_grad_() for t in qkv((96, 2, 32)))
        lengths, mask, max_len = cu(64, 32), None, 64
    else:
        q, k, v = (t.requires_grad_() for t in qkv((1, 2, 96, 32)))
        lengths, max_len = None, 0
        mask = torch.ones(1, 96, dtype=torch.bool)
        mask[0, 80:] = False
    return (q, k, v, *layout.tensors_on(q.device), 32, *window, 0.125, softcap, mask, lengths, max_len, backend)


@pytest.mark.parametrize("window", [(20, 20), (-1, 0)], ids=["window", "causal"])
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, varlen, window):
    # Soft-capped: the capped backward under autograd too.
    torch.library.opcheck(_attention_op, op_args(backend, varlen, window, 5.0))


def test_torch_compile_fullgraph_forward_and_backward():
    # Inductor reorders the projection's reductions, so compiled and eager agree to fp32 rounding,
    # compared element-wise (a sum over all outputs would amplify that rounding with its magnitude).
    layout = layouts.sliding_window(128, 32, 32)

    def attention_block(x, w):
        q, k, v = (x @ w).unflatten(-1, (3, 2, 32)).permute(2, 0, 3, 1, 4).unbind(0)
        return block_sparse_attention(q, k, v, layout, window=32, backend="torch")

    x = torch.randn(2, 128, 64)
    w = (torch.randn(64, 192) / 8).requires_grad_()
    grad_out = torch.randn(2, 2, 128, 32)
    compiled = torch.compile(attention_block, fullgraph=True, backend="inductor")
    out = compiled(x, w)
    out.backward(grad_out)
    grad_compiled = w.grad.clone()
    w.grad = None
    expected = attention_block(x, w)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_compiled, w.grad, rtol=1e-4, atol=1e-4)
