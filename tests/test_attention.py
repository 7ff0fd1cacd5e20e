"""block_sparse_attention against the float64 dense reference, forward and backward.

Without a GPU, backend="triton" runs the real kernels in Triton's interpreter (see conftest.py).
"""

import pytest
import torch

from helpers import CPU_BACKENDS, TOLERANCES, relative_error
from modernbert_kernels import block_sparse_attention, layouts, native
from modernbert_kernels.reference import block_sparse_attention_reference

HEADS = 2
BLOCK = 32
SEQ = 150  # not a multiple of the block
VARLEN_LENGTHS = [150, 37, 0, 96]  # includes an empty sequence


def random_block_mask(seq_len, block_size, heads):
    num_blocks = -(-seq_len // block_size)
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(heads, num_blocks, num_blocks, generator=generator) < 0.45
    mask[:, 1] = False  # a query block that sees nothing: its rows must come out as 0
    return mask


LAYOUTS = {
    "sliding_window": lambda: layouts.sliding_window(SEQ, 40, BLOCK),
    "global_tokens": lambda: layouts.global_tokens(SEQ, 32, BLOCK),
    "strided": lambda: layouts.strided(SEQ, 64, BLOCK),
    "fixed": lambda: layouts.fixed(SEQ, 64, 32, BLOCK),
    "dilated": lambda: layouts.dilated(SEQ, 64, 2, BLOCK),
    "bigbird_per_head": lambda: layouts.bigbird(SEQ, 32, 32, 1, BLOCK, seed=0, num_heads=HEADS),
    "from_block_mask_per_head": lambda: layouts.from_block_mask(random_block_mask(SEQ, BLOCK, HEADS), BLOCK),
    "union": lambda: layouts.union(layouts.sliding_window(SEQ, 16, BLOCK), layouts.global_tokens(SEQ, 32, BLOCK)),
    "dense": lambda: layouts.from_block_mask(torch.ones(5, 5, dtype=torch.bool), BLOCK),
}


def make_inputs(mode, dtype, head_dim, heads=HEADS, seed=0):
    """Fresh random q, k, v (and the batch description) for one of the three batch modes."""
    generator = torch.Generator().manual_seed(seed)
    extra = {}
    if mode == "varlen":
        shape = (sum(VARLEN_LENGTHS), heads, head_dim)
        cu = torch.tensor([0] + VARLEN_LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        extra["cu_seqlens"] = cu
    else:
        shape = (2, heads, SEQ, head_dim)
        if mode == "key_padding":
            keep = torch.ones(2, SEQ, dtype=torch.bool)
            keep[1, 100:] = False  # right padding
            keep[0, 10:20] = False  # and a hole, so the mask is not just a length
            extra["key_padding_mask"] = keep
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    dout = torch.randn(shape, generator=generator).to(dtype)
    return q, k, v, dout, extra


def check_against_reference(backend, layout, mode, window, dtype, head_dim=64, scale=None, magnitude=1.0,
                            tol=None):
    q, k, v, dout, extra = make_inputs(mode, dtype, head_dim)
    q, k = q * magnitude, k * magnitude
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=window, scale=scale, backend=backend, **extra)
    out.backward(dout)

    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=window, scale=scale, **extra)
    ref.backward(dout.double())

    assert out.dtype == dtype and out.shape == q.shape
    tol = TOLERANCES[dtype] if tol is None else tol
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", inputs, ref_inputs)
    ]:
        assert not torch.isnan(actual).any(), f"{name} has NaN"
        err = relative_error(actual, expected)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["padded", "key_padding", "varlen"])
@pytest.mark.parametrize("window", [None, 40], ids=["nowindow", "window40"])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_reference(backend, layout_name, window, mode, dtype, poison_allocations):
    check_against_reference(backend, LAYOUTS[layout_name](), mode, window, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_head_dims(backend, head_dim, dtype, poison_allocations):
    check_against_reference(backend, layouts.sliding_window(SEQ, 40, BLOCK), "varlen", 40, dtype, head_dim)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale(backend):
    check_against_reference(backend, LAYOUTS["bigbird_per_head"](), "padded", None, torch.float32, scale=0.37)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_logits(backend, poison_allocations):
    """Scores of several hundred: masked entries far above the row's LSE must not overflow.

    fp32 rounding of a score s perturbs exp(s - lse) by about |s| * 6e-8, so the tolerance grows
    with the logits: 5e-5 here instead of 1e-5.
    """
    check_against_reference(backend, LAYOUTS["sliding_window"](), "key_padding", 40, torch.float32,
                            magnitude=6.0, tol=5e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_that_see_no_key_are_zero(backend, poison_allocations):
    q, k, v, _, _ = make_inputs("padded", torch.float32, 32)
    keep = torch.zeros(2, SEQ, dtype=torch.bool)  # batch item 0 has no real key at all
    keep[1] = True
    out = block_sparse_attention(q, k, v, layouts.sliding_window(SEQ, 40, BLOCK), key_padding_mask=keep,
                                 backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("tile", [{"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 64, "BLOCK_N": 16}])
@pytest.mark.parametrize("mode", ["padded", "varlen"])
def test_triton_tiles_smaller_than_the_layout_block(tile, mode, poison_allocations):
    """Autotuned tiles may split a layout block; every split must give the same answer."""
    from modernbert_kernels.triton.attention_bwd import attention_backward
    from modernbert_kernels.triton.attention_fwd import attention_forward

    layout = layouts.sliding_window(SEQ, 50, 64)
    q, k, v, dout, extra = make_inputs(mode, torch.float32, 32)
    cu = extra.get("cu_seqlens")
    options = dict(window=50, scale=0.2, key_padding_mask=None, cu_seqlens=cu, max_seqlen=SEQ if cu is not None else None)
    tensors = layout.tensors_on(q.device)
    out, lse = attention_forward(q, k, v, tensors[:2], 64, 1, tile=tile, **options)
    grads = attention_backward(dout, q, k, v, out, lse, tensors, 64, 1, tile=tile, **options)

    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=50, scale=0.2, cu_seqlens=cu)
    ref.backward(dout.double())
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]
    for grad, ref_input in zip(grads, ref_inputs):
        assert relative_error(grad, ref_input.grad) <= TOLERANCES[torch.float32]


@pytest.mark.interpreter
def test_non_contiguous_inputs_from_a_fused_projection():
    """q, k, v sliced out of one fused [tokens, 3, heads, dim] projection, as in ModernBERT."""
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(VARLEN_LENGTHS), 3, HEADS, 64, generator=generator)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0] + VARLEN_LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    layout = layouts.sliding_window(SEQ, 40, BLOCK)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=40, cu_seqlens=cu)
    for backend in ("triton", "torch") + (("cpu",) if native.cpu_status()[0] else ()):
        out = block_sparse_attention(q, k, v, layout, window=40, cu_seqlens=cu, backend=backend)
        assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("min_run", [1, 10**6], ids=["all_diagonal_runs", "all_gathered"])
@pytest.mark.parametrize("mode", ["key_padding", "varlen"])
def test_torch_backend_tile_groups(min_run, mode, monkeypatch, poison_allocations):
    """The torch path computes diagonal runs as slices and the rest by gathering: both must agree."""
    from modernbert_kernels.torch_backend import plan

    monkeypatch.setattr(plan, "MIN_RUN", min_run)
    for name in ("union", "bigbird_per_head", "dilated"):
        check_against_reference("torch", LAYOUTS[name](), mode, 40, torch.float32)


@pytest.mark.parametrize("lengths", [[SEQ], [70, 0, SEQ]], ids=["one_sequence", "three_sequences"])
def test_dense_varlen_on_the_fused_cpu_kernel(lengths, poison_allocations):
    """Dense layouts on the torch path go to PyTorch's fused kernel; a lone sequence's output is
    taken from its layout as it is, several are copied into place."""
    generator = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(sum(lengths), HEADS, 64, generator=generator) for _ in range(4))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, LAYOUTS["dense"](), cu_seqlens=cu, backend="torch")
    out.backward(dout)
    assert out.is_contiguous()
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, LAYOUTS["dense"](), cu_seqlens=cu)
    ref.backward(dout.double())
    for actual, expected in [(out, ref)] + [(t.grad, r.grad) for t, r in zip(inputs, ref_inputs)]:
        assert relative_error(actual, expected) <= TOLERANCES[torch.float32]
