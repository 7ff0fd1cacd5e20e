"""Host reads of tensor values: none per layer, so a GPU forward has no per-layer sync and can be
captured in a CUDA graph. Counted with a TorchFunctionMode over the calls that copy a value to
the host (tolist, item, nonzero, bool(), int(), float(), numpy()); the ops themselves are one call
each, so what they read inside is covered by the CUDA-graph test on a GPU."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from modernbert import ModernBertConfig, ModernBertModel, quantize_int8
from modernbert_kernels import block_sparse_attention, int8_linear, layouts, quantize_per_token, rotary_embedding
from modernbert_kernels.int8 import quantize_per_channel

HOST_READS = {
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy,
}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def count_host_reads(fn, *args, **kwargs):
    with CountHostReads() as counter:
        fn(*args, **kwargs)
    return counter.reads


def tiny_config(layers):
    return ModernBertConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                            num_attention_heads=2, local_attention=32, global_attn_every_n_layers=3,
                            max_position_embeddings=512, pad_token_id=0)


def padded_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3, 150), generator=generator)
    mask = torch.ones(3, 150, dtype=torch.long)
    mask[1, 90:] = 0
    mask[2, 17:] = 0
    return ids, mask


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_encoder_host_reads_do_not_grow_with_depth(int8):
    ids, mask = padded_batch()
    counts = {}
    for layers in (3, 12):
        torch.manual_seed(0)
        model = ModernBertModel(tiny_config(layers)).eval()
        if int8:
            quantize_int8(model)
        with torch.no_grad():
            model(ids, mask)  # layouts and caches are built on the first call
            counts[layers] = count_host_reads(model, ids, mask)
    assert len(counts[3]) == len(counts[12]), counts
    # Unpadding reads the mask's nonzero positions and the longest length; on the CPU the
    # attention checks cu_seqlens once (on CUDA, with max_seqlen given, it reads nothing).
    assert sorted(counts[12]) == ["__int__", "nonzero", "tolist"], counts


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_ops_with_max_seqlen_read_cu_seqlens_once_per_tensor(backend):
    from modernbert_kernels import native

    if backend == "cpu" and not native.cpu_status()[0]:
        pytest.skip(native.cpu_status()[1])
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(200, 2, 32, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, 120, 200], dtype=torch.int32)
    layout = layouts.sliding_window(128, 32, 32)
    call = lambda: block_sparse_attention(q, k, v, layout, window=32, cu_seqlens=cu_seqlens, max_seqlen=120,
                                          backend=backend)
    assert len(count_host_reads(call)) == 1  # the values are checked the first time
    assert count_host_reads(call) == []
    cu_seqlens[1] = 80  # changed in place: checked again
    assert len(count_host_reads(call)) == 1


def test_elementwise_and_int8_ops_read_nothing():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(40, 64, generator=generator)
    w_q, w_scale = quantize_per_channel(torch.randn(96, 64, generator=generator))
    qkv = torch.randn(40, 2, 2, 32, generator=generator)
    angles = torch.rand(40, 16, generator=generator)

    def ops():
        x_q, x_scale = quantize_per_token(x, norm_weight=torch.ones(64))
        int8_linear(x_q, x_scale, w_q, w_scale, None, "geglu")
        rotary_embedding(qkv, angles.cos(), angles.sin(), inplace=True)

    assert count_host_reads(ops) == []


def test_bad_cu_seqlens_still_caught_on_cpu_with_max_seqlen():
    q = k = v = torch.randn(100, 2, 32)
    layout = layouts.sliding_window(128, 32, 32)
    with pytest.raises(ValueError, match="non-decreasing"):
        block_sparse_attention(q, k, v, layout, cu_seqlens=torch.tensor([0, 60, 50, 100], dtype=torch.int32),
                               max_seqlen=60)
    with pytest.raises(ValueError, match="shorter than the longest"):
        block_sparse_attention(q, k, v, layout, cu_seqlens=torch.tensor([0, 60, 100], dtype=torch.int32),
                               max_seqlen=50)
