"""FrozenEncoder and the bound calls it is made of (bind_attention, Linear.bind, Int8Linear.bind):
the same bits as the calls they stand for, and errors where they cannot stand for them."""

import time

import pytest
import torch

import modernbert.frozen as frozen_module
import modernbert_kernels.cpu_linear as cpu_linear
from modernbert import FrozenEncoder, ModernBertConfig, ModernBertModel, quantize_int8
from modernbert_kernels.encoder_layer import encoder_layers as native_layers
from modernbert_kernels import Int8Linear, bind_attention, bind_rotary, block_sparse_attention, layouts, rotary_embedding
from modernbert_kernels.cpu_linear import Linear, timing_tokens

# Two heads of 64; layer 0 global, then local layers (a window of 32 each side), so one input
# longer than 64 tokens crosses both kinds of layout and a block boundary.
CONFIG = dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
              local_attention=64, global_attn_every_n_layers=2, max_position_embeddings=512, pad_token_id=0)
PRECISIONS = ("fp32", "bf16", "int8", "int8_bf16_attention")


def model_in(precision: str, seed: int = 0, **config) -> ModernBertModel:
    torch.manual_seed(seed)
    model = ModernBertModel(ModernBertConfig(**{**CONFIG, **config})).eval()
    if precision == "bf16":
        model.to(torch.bfloat16)
    elif precision == "int8":
        quantize_int8(model)
    elif precision == "int8_bf16_attention":
        quantize_int8(model, attention_dtype=torch.bfloat16)
    return model


def padded_batch(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG["vocab_size"], (len(lengths), max(lengths)), generator=generator)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids * mask, mask.long()


# The frozen encoder runs a LayerNorm in the streamed GEMM's prologue where the model calls
# F.layer_norm: the same math, summed in another order. max |frozen - model| / max |model| over the
# test model's 3 layers; measured on a Xeon with every linear streamed: fp32 3e-7, bf16 3.8e-3 (one
# bf16 rounding, 2^-8, moved).
PROLOGUE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def assert_is_the_model(got, expected, streamed, message=""):
    """Bit for bit, or within PROLOGUE_TOLERANCE where a streamed GEMM normalizes its own input."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if not streamed or expected.dtype not in PROLOGUE_TOLERANCE:  # int8 folds its LayerNorm in both
        assert torch.equal(got, expected), f"{message}: {(got.float() - expected.float()).abs().max()}"
        return
    error = ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    assert error < PROLOGUE_TOLERANCE[expected.dtype], f"{message}: {error}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("gemm", [None, "onednn_packed"], ids=["chosen_gemm", "no_streamed_gemm"])
def test_frozen_encoder_is_the_model(precision, gemm, monkeypatch):
    """The model's output: bit for bit, unless a streamed GEMM (the few-token choice, or forced)
    runs the LayerNorm in front of it itself. With the GEMM forced to oneDNN's, bit for bit."""
    if gemm is not None:
        if precision.startswith("int8"):
            pytest.skip("an int8 model's linears run the int8 GEMM")
        monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", gemm)
    model = model_in(precision)
    frozen = FrozenEncoder(model)
    # One token, a short query, and a padded batch with an empty row and a row past two blocks:
    # three token regimes, each bound at its first call and reused at its second.
    for seed, lengths in enumerate([[1], [16], [150, 0, 37, 70], [16], [150, 0, 37, 70]]):
        ids, mask = padded_batch(lengths, seed)
        with torch.inference_mode():
            expected = model(ids, mask)
        got = frozen(ids, mask)
        streamed = gemm is None and streams_a_gemm(model, sum(lengths), frozen)
        assert_is_the_model(got, expected, streamed, f"{precision} {lengths}")


def streams_a_gemm(model, tokens, frozen=None):
    """Whether any of the model's float linears runs the streamed GEMM at this token count (a
    timed choice: it can differ between machines and runs), or ``frozen`` runs a float layer
    natively there (its own timed choice, FrozenEncoder._choose_layers)."""
    bound = frozen._bound.get(timing_tokens(tokens), []) if frozen is not None else []
    if any(layer.native is not None and len(layer.native.wqkv.weights) == 1 for layer in bound):  # [packed]
        return True
    with torch.inference_mode():
            return any(isinstance(module, Linear) and module._gemm(torch.empty(tokens, module.in_features,
                                                                              dtype=module.weight.dtype)) == "streamed"
                   for module in model.modules())


@pytest.mark.parametrize("attention_backend", ["torch", "reference"])
def test_frozen_encoder_runs_the_models_attention_backend(attention_backend):
    model = model_in("fp32")
    model.attention_backend = attention_backend
    ids, mask = padded_batch([150, 0, 37], seed=3)
    with torch.inference_mode():
        expected = model(ids, mask)
    assert_is_the_model(FrozenEncoder(model)(ids, mask), expected, streams_a_gemm(model, 187))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_frozen_encoder_runs_its_layers_in_one_native_call(precision, monkeypatch):
    """Where every linear of every layer runs the streamed GEMM (float) or the C++ int8 linear, the
    layers are one call (encoder_layer.py): the same kernels in the same order as their ops, so the
    same bits as the frozen encoder that calls them one by one; a layer that cannot run natively
    splits the call in two around it; with the torch attention backend (no native attention) every
    layer runs op by op."""
    if not precision.startswith("int8"):
        monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "streamed")
    model = model_in(precision)
    ids, mask = padded_batch([16, 5], seed=1)
    one_call, op_by_op, split = FrozenEncoder(model), FrozenEncoder(model), FrozenEncoder(model)
    got = one_call(ids, mask)
    assert all(layer.native is not None for layer in one_call._bound[16])
    op_by_op(ids, mask)
    op_by_op._bound[16] = [layer._replace(native=None) for layer in op_by_op._bound[16]]
    split(ids, mask)
    middle = CONFIG["num_hidden_layers"] // 2
    split._bound[16][middle] = split._bound[16][middle]._replace(native=None)
    calls = []
    monkeypatch.setattr(frozen_module, "encoder_layers",
                        lambda hidden, layers, *args: calls.append(len(layers)) or native_layers(hidden, layers, *args))
    assert torch.equal(one_call(ids, mask), got) and calls == [CONFIG["num_hidden_layers"]]
    assert torch.equal(op_by_op(ids, mask), got) and len(calls) == 1
    calls.clear()
    assert torch.equal(split(ids, mask), got) and calls == [middle, CONFIG["num_hidden_layers"] - middle - 1]
    model.attention_backend = "torch"
    with torch.inference_mode():
        expected = model(ids, mask)
    assert_is_the_model(FrozenEncoder(model)(ids, mask), expected, streamed=True)
    assert len(calls) == 2


@pytest.mark.parametrize("streamed_wins", [True, False], ids=["native_faster", "as_bound_faster"])
def test_frozen_encoder_weighs_native_layers_against_the_chosen_gemms(streamed_wins, monkeypatch):
    """Where the per-shape measurement chose another GEMM for a linear of a layer (here F.linear for
    Wo at a few tokens), the FrozenEncoder times the layers as bound against all of them natively on
    the streamed GEMM, once per token regime where the two differ, and keeps the faster; the model's
    output either way. Not where a GEMM is forced, nor at thousands of tokens."""
    def measured(dtype, in_features, out_features, threads, tokens):
        return "aten" if (in_features, out_features) == (128, 128) else "streamed"

    monkeypatch.setattr(cpu_linear, "_measured_gemm", measured)
    timings = []
    monkeypatch.setattr(frozen_module, "fastest", lambda runs: timings.append(len(runs)) or int(streamed_wins))
    model = model_in("fp32")
    frozen = FrozenEncoder(model)
    for lengths in ([16], [5, 9], [150, 37]):
        ids, mask = padded_batch(lengths, seed=len(lengths))
        with torch.inference_mode():
            expected = model(ids, mask)
        assert_is_the_model(frozen(ids, mask), expected, streamed=True)
    assert timings == [2]  # the 16-token regime only, timed at its first call
    assert all((layer.native is not None) == streamed_wins for layer in frozen._bound[16])
    # The streamed copies of Wo packed for the timing alone are kept only where they won it.
    assert all(layer.attn.Wo.has_streamed_copy() == streamed_wins for layer in model.layers)
    assert all(layer.mlp.Wo.has_streamed_copy() for layer in model.layers)  # the per-shape choice's
    assert all(layer.native is None and layer.streamed_native is None for layer in frozen._bound[2048])
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", "onednn_packed")
    forced = FrozenEncoder(model)
    ids, mask = padded_batch([16], seed=1)
    with torch.inference_mode():
        expected = model(ids, mask)
    assert_is_the_model(forced(ids, mask), expected, streamed=False)
    assert timings == [2] and all(layer.streamed_native is None for layer in forced._bound[16])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_frozen_encoder_reuses_the_last_batchs_tables_only_where_they_hold(precision):
    """RoPE's tables are kept for the next batch of the same lengths, the native attention's
    arguments for the same longest length: batches of the same lengths, of the same longest length
    but other lengths (other positions), and of another longest length, each the model's output."""
    model = model_in(precision)
    frozen = FrozenEncoder(model)
    for seed, lengths in enumerate([[16, 9], [16, 9], [9, 16], [12, 16, 3], [40, 7], [16, 9]]):
        ids, mask = padded_batch(lengths, seed)
        with torch.inference_mode():
            expected = model(ids, mask)
        assert_is_the_model(frozen(ids, mask), expected, streams_a_gemm(model, sum(lengths), frozen),
                            f"{precision} {lengths}")


def test_fastest_is_the_quickest_run():
    def quick():
        pass

    def slow():
        time.sleep(0.003)

    assert frozen_module.fastest([slow, quick]) == 1 and frozen_module.fastest([quick, slow]) == 0


def test_frozen_encoder_follows_the_models_inputs_checks():
    frozen = FrozenEncoder(model_in("fp32"))
    ids, mask = padded_batch([5, 3], seed=0)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        frozen(ids[0])
    with pytest.raises(ValueError, match="must match input_ids"):
        frozen(ids, mask[:, :4])
    long_ids = torch.ones(1, CONFIG["max_position_embeddings"] + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than max_position_embeddings"):
        frozen(long_ids)
    assert torch.equal(frozen(ids, torch.zeros_like(mask)), torch.zeros(2, 5, CONFIG["hidden_size"]))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_frozen_encoder_refuses_weights_changed_in_place(precision):
    model = model_in(precision)
    frozen = FrozenEncoder(model)
    ids, mask = padded_batch([12], seed=0)
    frozen(ids, mask)
    wqkv = model.layers[1].attn.Wqkv
    with torch.no_grad():
        (wqkv.weight_q if precision == "int8" else wqkv.weight).mul_(-1)
    with pytest.raises(RuntimeError, match="changed in place after it was frozen"):
        frozen(ids, mask)
    with torch.inference_mode():
        expected = model(ids, mask)
    refrozen = FrozenEncoder(model)
    assert_is_the_model(refrozen(ids, mask), expected, streams_a_gemm(model, 12, refrozen))


def test_frozen_encoder_refuses_what_it_does_not_run():
    with pytest.raises(TypeError, match="takes a ModernBertModel"):
        FrozenEncoder(torch.nn.Linear(2, 2))
    model = model_in("fp32")
    with pytest.raises(ValueError, match="eval mode"):
        FrozenEncoder(model.train())
    model.eval()
    model.layers[1].attn.head_gate = torch.ones(2)
    with pytest.raises(ValueError, match="head gate"):
        FrozenEncoder(model)
    model.layers[1].attn.head_gate = None
    model.layers[2].mlp.Wo = torch.nn.Linear(CONFIG["intermediate_size"], CONFIG["hidden_size"])
    with pytest.raises(TypeError, match=r"layer 2's mlp.Wo is a Linear"):
        FrozenEncoder(model)


def attention_inputs(dtype, lengths, seed, heads=2, head_dim=64):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(dtype) for _ in range(3))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("backend", [None, "torch", "reference"])
def test_bound_attention_is_block_sparse_attention(dtype, window, backend):
    lengths = [70, 3, 130]
    q, k, v, cu_seqlens = attention_inputs(dtype, lengths, seed=0)
    layout = layouts.dense(192, 64) if window is None else layouts.sliding_window(192, window, 64)
    arguments = dict(window=window, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), backend=backend)
    run = bind_attention(q, k, v, layout, **arguments)
    for seed in (1, 2):  # fresh inputs of the same shape run on the plan made for the first
        q, k, v, _ = attention_inputs(dtype, lengths, seed)
        assert torch.equal(run(q, k, v), block_sparse_attention(q, k, v, layout, **arguments))
    with pytest.raises(ValueError, match="this bound attention takes"):
        run(q[:-1], k[:-1], v[:-1])
    with pytest.raises(ValueError, match="this bound attention takes"):
        run(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        bind_attention(q[:-1], k[:-1], v[:-1], layout, **arguments)


def test_bound_attention_differentiates_like_the_op():
    q, k, v, cu_seqlens = attention_inputs(torch.float32, [20, 9], seed=0)
    layout = layouts.dense(64, 64)
    run = bind_attention(q, k, v, layout, cu_seqlens=cu_seqlens, max_seqlen=20)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    run(*leaves).square().sum().backward()
    expected = [t.clone().requires_grad_() for t in (q, k, v)]
    block_sparse_attention(*expected, layout, cu_seqlens=cu_seqlens, max_seqlen=20).square().sum().backward()
    for got, want in zip(leaves, expected):
        assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "residual", "gated"])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_bound_linear_is_its_forward(dtype, kind, tokens):
    torch.manual_seed(tokens)
    linear = Linear(64, 96).to(dtype).eval()
    x = torch.randn(tokens, 64).to(dtype)
    arguments = {"gated": "gelu"} if kind == "gated" else {}
    residual = torch.randn(tokens, 96).to(dtype) if kind == "residual" else None
    with torch.inference_mode():
        run = linear.bind(x, residual=residual, **arguments)
        for _ in range(2):
            x = torch.randn_like(x)
            residual = None if residual is None else torch.randn_like(residual)
            assert torch.equal(run(x, residual), linear(x, residual=residual, **arguments))
    with pytest.raises(ValueError, match="takes no residual"):
        linear.bind(x, gated="gelu", residual=torch.zeros(tokens, 48, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemm", ["streamed", "onednn_packed", "aten"])
@pytest.mark.parametrize("norm", ["layer_norm", "layer_norm_bias", "identity", "rms_norm"])
@pytest.mark.parametrize("gated", [None, "gelu"])
def test_bound_linear_with_its_norm(dtype, gemm, norm, gated, monkeypatch):
    """bind(x, norm=norm) computes forward(norm(x)): a LayerNorm in the streamed GEMM's prologue
    (within rounding of the order of its sums), any other norm or GEMM as the two calls (bit for bit)."""
    monkeypatch.setenv("MODERNBERT_KERNELS_CPU_GEMM", gemm)
    torch.manual_seed(len(norm))
    linear = Linear(64, 96).to(dtype).eval()
    module = {"layer_norm": torch.nn.LayerNorm(64, bias=False), "layer_norm_bias": torch.nn.LayerNorm(64),
              "identity": torch.nn.Identity(), "rms_norm": torch.nn.RMSNorm(64)}[norm].to(dtype)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.5)
    x = (torch.randn(5, 64) * 4 + 2).to(dtype)
    with torch.inference_mode():
        got = linear.bind(x, gated=gated, norm=module)(x, None)
        expected = linear(module(x), gated=gated)
    if gemm == "streamed" and norm.startswith("layer_norm"):
        error = ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
        assert error < {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "normed", "residual", "geglu"])
def test_bound_int8_linear_is_its_forward(out_dtype, kind):
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(64, 96), activation="geglu" if kind == "geglu" else None)
    x = torch.randn(16, 64)
    arguments = dict(out_dtype=out_dtype)
    if kind == "normed":
        arguments.update(norm_weight=torch.rand(64) + 0.5, eps=1e-6)
    residual = torch.randn(16, 96).to(out_dtype) if kind == "residual" else None
    run = layer.bind(x, residual=residual, **arguments)
    for _ in range(2):
        x, residual = torch.randn_like(x), None if residual is None else torch.randn_like(residual)
        assert torch.equal(run(x, residual), layer(x, residual=residual, **arguments))
    with pytest.raises(ValueError, match="this bound Int8Linear takes"):
        run(x.double())
    with pytest.raises(ValueError, match="this bound Int8Linear takes"):
        run(x[:, :32])
    if residual is not None:
        with pytest.raises(ValueError, match="residual must be"):
            run(x, residual[:-1])
    with pytest.raises(ValueError, match=r"Int8Linear.bind takes x \[M, 64\]"):
        layer.bind(x[None])
    with pytest.raises(TypeError, match="out_dtype must be"):
        layer.bind(x, out_dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bound_rotary_is_rotary_embedding_in_place(dtype):
    generator = torch.Generator().manual_seed(0)
    tokens, heads, head_dim = 19, 3, 64
    cos, sin = (torch.randn(tokens, head_dim // 2, generator=generator) for _ in range(2))
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=generator).to(dtype)
    turn = bind_rotary(qkv[:, :2], cos, sin)
    for seed in (1, 2):  # fresh tensors of the same shape and strides
        qkv = torch.randn(tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
        expected = qkv.clone()
        rotary_embedding(expected[:, :2], cos, sin, inplace=True)
        assert turn(qkv[:, :2]) is not None
        assert torch.equal(qkv, expected)  # q and k turned in place, v untouched
    with pytest.raises(ValueError, match="this bound rotary embedding takes"):
        turn(qkv[:, :2].contiguous())  # same shape, other strides
    with pytest.raises(ValueError, match="this bound rotary embedding takes"):
        turn(qkv[:-1, :2])
    with pytest.raises(ValueError, match="cannot record a gradient"):
        turn(qkv.clone().requires_grad_()[:, :2])
    with pytest.raises(ValueError, match=r"cos must be \[tokens, head_dim / 2\]"):
        bind_rotary(qkv[:, :2], cos[:-1], sin)
