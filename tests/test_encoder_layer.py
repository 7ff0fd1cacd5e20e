"""The native encoder layers (modernbert_kernels.encoder_layer) against their float64 reference."""

import pytest
import torch

from modernbert_kernels import bind_attention, layouts, native
from modernbert_kernels._ops import ops
from modernbert_kernels.encoder_layer import EncoderLayer, NativeLinear, encoder_layer_reference, encoder_layers
from modernbert_kernels.streamed_gemm import pack_streamed_weight

pytestmark = pytest.mark.skipif(not native.cpu_status()[0], reason="needs the C++ CPU kernels")

HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE = 128, 2, 64, 96
# max |error| / max |reference| over the layer: fp32 sums (measured ~4e-7); bf16 rounds q, k, v, the
# attention output, both residual sums and the gated activation to bf16 (measured ~7e-3).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def random_layer(dtype, first_layer, biases, seed):
    """Unpacked weights (the reference's) and the same packed (the native call's)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    weights = dict(
        attn_norm_weight=None if first_layer else (torch.rand(HIDDEN, generator=generator) + 0.5).to(dtype),
        attn_norm_bias=None if first_layer or not biases else randn(HIDDEN, scale=0.1),
        wqkv=randn(3 * HIDDEN, HIDDEN, scale=HIDDEN**-0.5), wqkv_bias=randn(3 * HIDDEN, scale=0.1) if biases else None,
        wo=randn(HIDDEN, HIDDEN, scale=HIDDEN**-0.5), wo_bias=randn(HIDDEN, scale=0.1) if biases else None,
        mlp_norm_weight=(torch.rand(HIDDEN, generator=generator) + 0.5).to(dtype),
        mlp_norm_bias=randn(HIDDEN, scale=0.1) if biases else None,
        wi=randn(2 * INTERMEDIATE, HIDDEN, scale=HIDDEN**-0.5), wi_bias=randn(2 * INTERMEDIATE, scale=0.1) if biases else None,
        wo2=randn(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE**-0.5), wo2_bias=randn(HIDDEN, scale=0.1) if biases else None)
    return weights


def packed_layer(weights, gate, eps=1e-5):
    def fp32(name):
        return None if weights[name] is None else weights[name].float()

    def streamed(name, gated=False):
        return NativeLinear((pack_streamed_weight(weights[name], gated),), fp32(f"{name}_bias"))

    return EncoderLayer(fp32("attn_norm_weight"), fp32("attn_norm_bias"), streamed("wqkv"), weights["wqkv"].dtype,
                        HEADS, streamed("wo"), fp32("mlp_norm_weight"), fp32("mlp_norm_bias"), streamed("wi", True),
                        gate, INTERMEDIATE, streamed("wo2"), eps)


def packed_batch(lengths, dtype, seed, theta=10000.0):
    """hidden [tokens, HIDDEN], cu_seqlens, and RoPE's cos / sin at each token's position."""
    generator = torch.Generator().manual_seed(seed)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).float()
    angles = positions[:, None] / theta ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    hidden = (torch.randn(int(cu_seqlens[-1]), HIDDEN, generator=generator) * 2).to(dtype)
    return hidden, cu_seqlens, angles.cos(), angles.sin()


def native_attention(hidden, cu_seqlens, max_seqlen, window):
    layout = (layouts.dense if window is None else lambda n, b: layouts.sliding_window(n, window, b))(
        -(-max_seqlen // 64) * 64, 64)
    sample = hidden.new_empty(hidden.shape[0], 3, HEADS, HEAD_DIM)
    run = bind_attention(*sample.unbind(1), layout, window=window, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                         backend="cpu")
    return layout, run.native_arguments


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[1], [16], [5, 16, 70]], ids=["one_token", "query", "three_sequences"])
@pytest.mark.parametrize("window", [None, 32], ids=["global", "window"])
@pytest.mark.parametrize("first_layer, biases, gate", [(False, False, "gelu"), (True, True, "silu"),
                                                       (False, True, "gelu_tanh")],
                         ids=["layer_norms", "no_attn_norm_biases_silu", "biases_gelu_tanh"])
def test_layer_matches_float64(dtype, lengths, window, first_layer, biases, gate):
    weights = random_layer(dtype, first_layer, biases, seed=sum(lengths) + len(gate))
    hidden, cu_seqlens, cos, sin = packed_batch(lengths, dtype, seed=len(lengths))
    layout, attention = native_attention(hidden, cu_seqlens, max(lengths), window)
    before = hidden.clone()
    torch.full((hidden.shape[0], 4 * HIDDEN), float("nan"), dtype=dtype)  # freed NaN where outputs may land
    out = encoder_layers(hidden, [packed_layer(weights, gate)], [(cos, sin)], [attention])
    expected = encoder_layer_reference(hidden, weights, HEADS, gate, 1e-5, cos, sin, layout, window, cu_seqlens)
    assert out.shape == hidden.shape and out.dtype == dtype
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert torch.equal(hidden, before)  # the residual is read, not written


def test_layer_is_the_chain_of_its_ops():
    """The same kernels as the ops called one by one from Python, so the same bits."""
    from modernbert_kernels import block_sparse_attention, rotary_embedding
    from modernbert_kernels.streamed_gemm import streamed_linear

    weights = random_layer(torch.float32, False, True, seed=3)
    layer = packed_layer(weights, "gelu")
    hidden, cu_seqlens, cos, sin = packed_batch([16, 9], torch.float32, seed=3)
    layout, attention = native_attention(hidden, cu_seqlens, 16, 32)
    qkv = streamed_linear(hidden, layer.wqkv.weights[0], 3 * HIDDEN, layer.wqkv.bias, norm_weight=layer.attn_norm_weight,
                          norm_bias=layer.attn_norm_bias).view(-1, 3, HEADS, HEAD_DIM)
    rotary_embedding(qkv[:, :2], cos, sin, inplace=True, backend="cpu")
    attended = block_sparse_attention(*qkv.unbind(1), layout, window=32, cu_seqlens=cu_seqlens, max_seqlen=16,
                                      backend="cpu").reshape(-1, HIDDEN)
    after = streamed_linear(attended, layer.wo.weights[0], HIDDEN, layer.wo.bias, residual=hidden)
    activated = streamed_linear(after, layer.wi.weights[0], INTERMEDIATE, layer.wi.bias, "gelu",
                                norm_weight=layer.mlp_norm_weight, norm_bias=layer.mlp_norm_bias)
    chained = streamed_linear(activated, layer.wo2.weights[0], HIDDEN, layer.wo2.bias, residual=after)
    assert torch.equal(encoder_layers(hidden, [layer], [(cos, sin)], [attention]), chained)


@pytest.mark.parametrize("change, message", [
    (lambda h, l, c, s: (h.t().contiguous().t(), l, c, s), "hidden must be a contiguous"),
    (lambda h, l, c, s: (h.double(), l, c, s), "hidden must be fp32 or bf16"),
    (lambda h, l, c, s: (h.bfloat16(), l, c, s), "Wqkv: a streamed linear writes its input's dtype"),
    (lambda h, l, c, s: (h, l._replace(qkv_dtype=torch.bfloat16), c, s), "Wqkv: a streamed linear writes its input's"),
    (lambda h, l, c, s: (h, l._replace(wi_activation="none"), c, s), "Wi is a gated projection: name its activation"),
    (lambda h, l, c, s: (h, l._replace(wi_activation="tanh"), c, s), "gate must be"),
    (lambda h, l, c, s: (h, l._replace(wo=NativeLinear((), None)), c, s), "Wqkv and Wo must be given"),
    (lambda h, l, c, s: (h, l._replace(wi=l.wi._replace(weights=l.wi.weights * 2)), c, s),
     r"Wi must be \[packed\] \(streamed\) or \[w_q, w_scale, w_packed\(, smooth\)\] \(int8\), got 2"),
    (lambda h, l, c, s: (h, l._replace(heads=0), c, s), "heads must be positive"),
    (lambda h, l, c, s: (h, l._replace(heads=3), c, s), "not a multiple of heads = 3"),
    (lambda h, l, c, s: (h, l._replace(heads=4), c, s), r"cos and sin must be \[tokens, head_dim / 2\] = \[8, 16\]"),
    (lambda h, l, c, s: (h, l._replace(wo=NativeLinear((l.wo.weights[0][0],), None)), c, s),
     "Wo's weight must be a pack_streamed_weight copy"),
    (lambda h, l, c, s: (h, l, c[:, :16], s), r"cos and sin must be \[tokens, head_dim / 2\]"),
    (lambda h, l, c, s: (h, l, c, s[:-1]), r"cos and sin must be \[tokens, head_dim / 2\]"),
    (lambda h, l, c, s: (h, l._replace(attn_norm_weight=torch.ones(7)), c, s), r"norm_weight must be \[128\]"),
])
def test_bad_input_is_refused(change, message):
    weights = random_layer(torch.float32, False, False, seed=0)
    hidden, cu_seqlens, cos, sin = packed_batch([8], torch.float32, seed=0)
    _, attention = native_attention(hidden, cu_seqlens, 8, None)
    hidden, layer, cos, sin = change(hidden, packed_layer(weights, "gelu"), cos, sin)
    with pytest.raises(RuntimeError, match=message):
        encoder_layers(hidden, [layer], [(cos, sin)], [attention])


@pytest.mark.parametrize("cu_seqlens, max_seqlen, message", [
    ([0, 4, 9], 8, "from 0 to the 8 tokens of hidden, got 0 to 9"),
    ([1, 8], 8, "from 0 to the 8 tokens"),
    ([0, 6, 4, 8], 8, "must not decrease"),
    ([0, 8], 4, "longer than max_seqlen = 4"),
])
def test_lengths_that_do_not_fit_hidden_are_refused(cu_seqlens, max_seqlen, message):
    """The attention's lengths are checked against hidden's tokens: the kernel reads them unchecked."""
    weights = random_layer(torch.float32, False, False, seed=0)
    hidden, bound_lengths, cos, sin = packed_batch([8], torch.float32, seed=0)
    _, attention = native_attention(hidden, bound_lengths, 8, None)
    attention = attention._replace(cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32), max_seqlen=max_seqlen)
    with pytest.raises(RuntimeError, match=message):
        encoder_layers(hidden, [packed_layer(weights, "gelu")], [(cos, sin)], [attention])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layers_in_one_call_are_the_chain_of_single_layers(dtype):
    """Three layers (global, windowed, global; their own weights, norms and RoPE) in one call: the
    same bits as one call a layer, and the float64 layers chained within the tolerance."""
    lengths = [16, 9]
    hidden, cu_seqlens, _, _ = packed_batch(lengths, dtype, seed=5)
    layers, weights, rope, attentions, references = [], [], [], [], []
    for index, (window, first_layer, theta) in enumerate([(None, True, 160000.0), (32, False, 10000.0),
                                                          (None, False, 160000.0)]):
        weights.append(random_layer(dtype, first_layer, biases=index == 1, seed=10 + index))
        layers.append(packed_layer(weights[-1], "gelu"))
        rope.append(packed_batch(lengths, dtype, seed=5, theta=theta)[2:])
        layout, attention = native_attention(hidden, cu_seqlens, max(lengths), window)
        attentions.append(attention)
        references.append((layout, window))
    attentions = [a._replace(cu_seqlens=cu_seqlens) for a in attentions]
    chained = hidden
    for layer, cos_sin, attention in zip(layers, rope, attentions):
        chained = encoder_layers(chained, [layer], [cos_sin], [attention])
    torch.full((hidden.shape[0], 4 * HIDDEN), float("nan"), dtype=dtype)  # freed NaN where outputs may land
    out = encoder_layers(hidden, layers, rope, attentions)
    assert torch.equal(out, chained)
    expected = hidden.double()
    for layer_weights, (cos, sin), (layout, window) in zip(weights, rope, references):
        expected = encoder_layer_reference(expected, layer_weights, HEADS, "gelu", 1e-5, cos, sin, layout, window,
                                           cu_seqlens)
    assert relative_error(out, expected) < 2 * TOLERANCE[dtype]


def test_layers_that_do_not_share_a_call_are_refused():
    weights = random_layer(torch.float32, False, False, seed=0)
    hidden, cu_seqlens, cos, sin = packed_batch([8], torch.float32, seed=0)
    _, attention = native_attention(hidden, cu_seqlens, 8, None)
    layer = packed_layer(weights, "gelu")
    with pytest.raises(ValueError, match="one rope and one attention a layer"):
        encoder_layers(hidden, [layer, layer], [(cos, sin)], [attention, attention])
    with pytest.raises(ValueError, match="no layers given"):
        encoder_layers(hidden, [], [], [])
    with pytest.raises(ValueError, match="must share qkv_dtype, wi_activation and eps"):
        encoder_layers(hidden, [layer, layer._replace(eps=1e-6)], [(cos, sin)] * 2, [attention] * 2)
    with pytest.raises(ValueError, match="must share cu_seqlens"):
        encoder_layers(hidden, [layer, layer], [(cos, sin)] * 2,
                       [attention, attention._replace(cu_seqlens=cu_seqlens.clone())])


def test_inconsistent_per_layer_lists_are_refused():
    """The op's own checks, for callers that build its lists themselves."""
    weights = random_layer(torch.float32, False, False, seed=0)
    hidden, cu_seqlens, cos, sin = packed_batch([8], torch.float32, seed=0)
    _, a = native_attention(hidden, cu_seqlens, 8, None)
    layer = packed_layer(weights, "gelu")
    norms = [layer.attn_norm_weight, None, layer.mlp_norm_weight, None]
    linears = (layer.wqkv, layer.wo, layer.wi, layer.wo2)
    packed = [linear.weights[0] for linear in linears]

    def call(norms=norms, packed=packed, counts=(1, 1, 1, 1), heads=(HEADS,), cos_list=(cos,)):
        return ops.encoder_layers_native(hidden, norms, packed, list(counts), [None] * 4, list(heads), [INTERMEDIATE],
                                         list(cos_list), [sin], [a.row_offsets], [a.col_indices], [a.block_size],
                                         [a.window_left], [a.window_right], [a.scale], cu_seqlens, 8, torch.float32,
                                         "gelu", 1e-5)

    assert call().shape == hidden.shape
    with pytest.raises(RuntimeError, match="no layers given"):
        call(heads=())
    with pytest.raises(RuntimeError, match="must hold 4 entries a layer for 1 layers"):
        call(norms=norms[:3])
    with pytest.raises(RuntimeError, match="weight_counts add up to 5 tensors, but 4 weights are given"):
        call(counts=(2, 1, 1, 1))
    with pytest.raises(RuntimeError, match="weight_counts must not be negative"):
        call(counts=(-1, 3, 1, 1))
    with pytest.raises(RuntimeError, match="one entry a layer for 1 layers, got 2"):
        call(cos_list=(cos, cos))
