"""Triton kernels compiled for the real GPU (autotuned configs), bf16 and fp16, against float64."""

import pytest
import torch

from helpers import TOLERANCES, relative_error
from modernbert_kernels import block_sparse_attention, layouts
from modernbert_kernels.reference import block_sparse_attention_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def one_config(request, monkeypatch):
    """Correctness runs one shipped config per kernel: autotuning each of the ~100 problem classes
    here would spend minutes of a rare GPU session compiling. test_autotuned_launch tunes once."""
    if "autotuned" not in request.node.name:
        monkeypatch.setenv("MODERNBERT_KERNELS_AUTOTUNE", "0")

SEQ = 1000
GPU_LAYOUTS = {
    "sliding_window_64": lambda: layouts.sliding_window(SEQ, 64, 64),
    "sliding_window_128": lambda: layouts.sliding_window(SEQ, 100, 128),
    "bigbird_per_head": lambda: layouts.bigbird(SEQ, 64, 64, 2, 64, seed=1, num_heads=4),
    "global_tokens": lambda: layouts.global_tokens(SEQ, 64, 64),
    "fixed_32": lambda: layouts.fixed(SEQ, 128, 32, 32),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["padded", "varlen"])
@pytest.mark.parametrize("window", [None, 64], ids=["nowindow", "window64"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("layout_name", list(GPU_LAYOUTS))
def test_triton_on_gpu(layout_name, head_dim, window, mode, dtype):
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
    out = block_sparse_attention(*inputs, layout, window=window, backend="triton", **extra)
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
