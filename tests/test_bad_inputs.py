"""The bad-input catalogue: every kind of wrong input across the public API gets a clear error of a
stated type whose message names the problem (README, "Bad input"). Inputs that are odd but valid
(an empty batch, padding-only rows, a window wider than the sequence) are handled, tested below."""

import json

import pytest
import torch

from modernbert import ModernBertConfig, ModernBertModel
from modernbert_kernels import (
    BlockSparseLayout,
    Int8Linear,
    block_sparse_attention,
    int8_linear,
    int8_linear_dynamic,
    layouts,
    quantize_per_token,
    rotary_embedding,
)
from modernbert_kernels.int8 import quantize_per_channel
from modernbert_kernels.reference import block_sparse_attention_reference

LAYOUT = layouts.sliding_window(64, 32, 32)


def qkv(*shape, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(3)]


def attention(*, shape=(1, 2, 64, 64), layout=LAYOUT, **kwargs):
    q, k, v = qkv(*shape)
    return block_sparse_attention(q, k, v, layout, **kwargs)


def varlen(cu_seqlens, **kwargs):
    q, k, v = qkv(100, 2, 64)
    return block_sparse_attention(q, k, v, layouts.sliding_window(128, 32, 32), cu_seqlens=cu_seqlens, **kwargs)


def cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


W_Q, W_SCALE = quantize_per_channel(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)))
X_Q, X_SCALE = quantize_per_token(torch.randn(5, 64, generator=torch.Generator().manual_seed(2)))
ANGLES = torch.rand(4, 16)


def tiny_config(**overrides):
    values = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  local_attention=32, global_attn_every_n_layers=2, max_position_embeddings=128, pad_token_id=0)
    return ModernBertConfig(**{**values, **overrides})


def encoder(ids, mask=None):
    torch.manual_seed(0)
    return ModernBertModel(tiny_config()).eval()(ids, mask)


def saved_checkpoint(tmp_path, edit_config=None, edit_weights=None):
    torch.manual_seed(0)
    ModernBertModel(tiny_config()).save_pretrained(tmp_path)
    if edit_config:
        path = tmp_path / "config.json"
        path.write_text(edit_config(path.read_text()))
    if edit_weights:
        path = tmp_path / "model.safetensors"
        path.write_bytes(edit_weights(path.read_bytes()))
    return tmp_path


def edit_json(change):
    def edit(text):
        values = json.loads(text)
        change(values)
        return json.dumps(values)
    return edit


# (kind, call, error type, what the message must say). Calls that need a folder take tmp_path.
CATALOGUE = [
    # block_sparse_attention
    ("q of the wrong rank", lambda: attention(shape=(2, 64, 64)), ValueError, r"q must be \[batch, heads, seq, head_dim\]"),
    ("k of another shape", lambda: block_sparse_attention(*qkv(1, 2, 64, 64)[:1], *qkv(1, 2, 32, 64)[1:], LAYOUT),
     ValueError, r"k has shape"),
    ("k of another dtype", lambda: block_sparse_attention(qkv(1, 2, 64, 64)[0], *qkv(1, 2, 64, 64, dtype=torch.float16)[1:],
                                                          LAYOUT), TypeError, r"share a dtype"),
    ("an unsupported dtype", lambda: block_sparse_attention(*qkv(1, 2, 64, 64, dtype=torch.float64), LAYOUT), TypeError,
     r"supported: fp16, bf16, fp32"),
    ("a head_dim past the kernels' for a kernel backend", lambda: attention(shape=(1, 2, 64, 512), backend="cpu"),
     ValueError, r"head_dim 512 runs on the 'torch' and 'reference' backends only"),
    ("k on another device", lambda: block_sparse_attention(qkv(1, 2, 64, 64)[0], *qkv(1, 2, 64, 64, device="meta")[1:],
                                                           LAYOUT), ValueError, r"k is on meta but q is on cpu"),
    ("a layout of another type", lambda: attention(layout=torch.ones(2, 2, dtype=torch.bool)), TypeError,
     r"layout must be a BlockSparseLayout"),
    ("a layout with the wrong head count", lambda: attention(layout=layouts.bigbird(64, 32, 32, 1, 32, num_heads=3)),
     ValueError, r"layout has 3 heads; q has 2"),
    ("a sequence longer than the layout", lambda: attention(shape=(1, 2, 96, 64)), ValueError, r"layout covers 64 tokens"),
    ("a negative window", lambda: attention(window=-1), ValueError, r"window must be None or an int >= 0"),
    ("a non-integer window", lambda: attention(window=2.5), ValueError, r"window must be None or an int >= 0"),
    ("cu_seqlens of the wrong dtype", lambda: varlen(cu(0, 60, 100, dtype=torch.int64)), TypeError,
     r"cu_seqlens must be a 1-D int32"),
    ("cu_seqlens not ending at the token count", lambda: varlen(cu(0, 60, 90)), ValueError, r"end at total_tokens=100"),
    ("decreasing cu_seqlens", lambda: varlen(cu(0, 60, 50, 100)), ValueError, r"non-decreasing"),
    ("max_seqlen below the longest sequence", lambda: varlen(cu(0, 60, 100), max_seqlen=50), ValueError,
     r"shorter than the longest sequence \(60\)"),
    ("max_seqlen without cu_seqlens", lambda: attention(max_seqlen=64), ValueError, r"only meaningful with cu_seqlens"),
    ("key_padding_mask with cu_seqlens", lambda: varlen(cu(0, 60, 100), key_padding_mask=torch.ones(2, 60, dtype=torch.bool)),
     ValueError, r"exclude each other"),
    ("a non-bool key_padding_mask", lambda: attention(key_padding_mask=torch.ones(1, 64)), TypeError,
     r"key_padding_mask must be a bool tensor"),
    ("a key_padding_mask of the wrong shape", lambda: attention(key_padding_mask=torch.ones(1, 32, dtype=torch.bool)),
     ValueError, r"key_padding_mask must have shape \(1, 64\)"),
    ("non-bool global tokens", lambda: attention(global_tokens=torch.zeros(1, 64, dtype=torch.int64)), TypeError,
     r"global_tokens must be a bool tensor \[1, 64\]"),
    ("global tokens of the wrong shape", lambda: attention(global_tokens=torch.zeros(64, dtype=torch.bool)), ValueError,
     r"global_tokens must be \[batch, seq\] = \(1, 64\), got \(64,\)"),
    ("padded global tokens on a varlen batch", lambda: varlen(cu(0, 60, 100), global_tokens=torch.zeros(2, 60, dtype=torch.bool)),
     ValueError, r"global_tokens must be \[total_tokens\] with cu_seqlens = \(100,\)"),
    ("global tokens on another device", lambda: attention(global_tokens=torch.zeros(1, 64, dtype=torch.bool, device="meta")),
     ValueError, r"global_tokens is on meta but q is on cpu"),
    ("an unknown backend", lambda: attention(backend="fast"), ValueError, r"backend must be one of"),
    ("a backend for another device", lambda: block_sparse_attention(*qkv(1, 2, 64, 64, device="meta"), LAYOUT, backend="cpu"),
     ValueError, r"runs on cpu tensors, got meta tensors"),
    # layouts
    ("a zero block size", lambda: layouts.sliding_window(128, 32, 0), ValueError, r"block_size must be an int in \[16, 128\]"),
    ("a negative block size", lambda: layouts.sliding_window(128, 32, -32), ValueError, r"block_size must be an int in"),
    ("a block size that is not a power of two", lambda: layouts.sliding_window(144, 32, 48), ValueError, r"power of two"),
    ("an empty sequence for a layout", lambda: layouts.sliding_window(0, 32, 32), ValueError, r"seq_len must be a positive int"),
    ("a block mask of the wrong rank", lambda: layouts.from_block_mask(torch.ones(4, dtype=torch.bool), 32), ValueError,
     r"block_mask must have shape"),
    ("a block mask of the wrong dtype", lambda: layouts.from_block_mask(torch.ones(4, 4), 32), TypeError,
     r"block_mask must be a bool tensor"),
    ("key blocks out of range", lambda: BlockSparseLayout(cu(0, 1, 2).reshape(1, 3), cu(0, 5), 32), ValueError,
     r"out of range \[0, 2\)"),
    ("unsorted key blocks", lambda: BlockSparseLayout(cu(0, 2, 3).reshape(1, 3), cu(1, 0, 1), 32), ValueError,
     r"not sorted"),
    # int8
    ("Int8Linear with the wrong in_features", lambda: Int8Linear.from_float(torch.nn.Linear(64, 32))(torch.randn(5, 48)),
     ValueError, r"expects 64 input features"),
    ("non-int8 weights", lambda: int8_linear(X_Q, X_SCALE, W_Q.float(), W_SCALE), TypeError, r"w_q must be a torch.int8"),
    ("activations and weights of different K", lambda: int8_linear(X_Q[:, :48], X_SCALE, W_Q, W_SCALE), ValueError,
     r"must share K"),
    ("scales of the wrong length", lambda: int8_linear(X_Q, X_SCALE[:3], W_Q, W_SCALE), ValueError, r"x_scale must be \[5\]"),
    ("an unknown epilogue", lambda: int8_linear(X_Q, X_SCALE, W_Q, W_SCALE, None, "relu"), ValueError,
     r"activation must be one of"),
    ("a residual of another width", lambda: int8_linear(X_Q, X_SCALE, W_Q, W_SCALE, None, "geglu",
                                                         residual=torch.zeros(5, 8, dtype=torch.bfloat16)),
     ValueError, r"residual must be \[5, 16\]"),
    ("a residual of another dtype than the output", lambda: int8_linear(X_Q, X_SCALE, W_Q, W_SCALE,
                                                                          residual=torch.zeros(5, 8)),
     TypeError, r"residual must be a torch.bfloat16 tensor"),
    ("a packed weight that int8_pack_weight did not make", lambda: int8_linear(X_Q, X_SCALE, W_Q, W_SCALE,
                                                                                packed_weight=torch.zeros(64)),
     TypeError, r"packed_weight must be what int8_pack_weight\(w_q\) returned"),
    ("a 1-D tensor to quantize", lambda: quantize_per_token(torch.randn(64)), ValueError, r"x must be \[M, K\]"),
    ("int8 activations for the dynamic int8 linear", lambda: int8_linear_dynamic(X_Q, W_Q, W_SCALE), TypeError,
     r"x must be a floating-point tensor"),
    # rotary
    ("an odd head_dim for RoPE", lambda: rotary_embedding(torch.randn(4, 2, 2, 33), ANGLES, ANGLES), ValueError,
     r"head_dim must be even"),
    ("angles for another token count", lambda: rotary_embedding(torch.randn(4, 2, 2, 32), torch.rand(5, 16), torch.rand(5, 16)),
     ValueError, r"cos must be \[tokens, head_dim / 2\]"),
    # the encoder
    ("1-D input_ids", lambda: encoder(torch.ones(8, dtype=torch.long)), ValueError, r"input_ids must be \[batch, seq\]"),
    ("a mask of another shape", lambda: encoder(torch.ones(2, 8, dtype=torch.long), torch.ones(2, 7)), ValueError,
     r"must match input_ids"),
    ("a sequence longer than max_position_embeddings", lambda: encoder(torch.ones(1, 200, dtype=torch.long)), ValueError,
     r"200 tokens is longer than max_position_embeddings=128"),
    # loading
    ("a missing folder", lambda tmp_path: ModernBertModel.from_pretrained(tmp_path / "absent"), FileNotFoundError,
     r"no config.json in"),
    ("truncated safetensors", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_weights=lambda data: data[: len(data) // 2])), ValueError, r"corrupt or truncated"),
    ("corrupt safetensors", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_weights=lambda data: b"not a safetensors file")), ValueError, r"corrupt or truncated"),
    ("config.json that is not JSON", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_config=lambda text: text[:-5])), ValueError, r"is not valid JSON"),
    ("config.json without a shape field", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_config=edit_json(lambda c: c.pop("hidden_size")))), ValueError, r"lacks hidden_size"),
    ("config.json with a mistyped field", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_config=edit_json(lambda c: c.update(num_hidden_layers="two")))), TypeError,
     r"config field num_hidden_layers must be int, got 'two'"),
    ("a checkpoint of another architecture", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_config=edit_json(lambda c: c.update(model_type="bert")))), ValueError,
     r"config for a 'bert' model, not ModernBERT"),
    ("weights of another width than the config's", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_config=edit_json(lambda c: c.update(intermediate_size=2 * c["intermediate_size"])))),
     ValueError, r"tensors of other shapes than ModernBertModel: .*mlp"),
    ("weights that do not fit the config", lambda tmp_path: ModernBertModel.from_pretrained(
        saved_checkpoint(tmp_path, edit_config=edit_json(lambda c: c.update(num_hidden_layers=3, layer_types=c["layer_types"] + c["layer_types"][:1])))),
     ValueError,
     r"does not match ModernBertModel: missing"),
]


@pytest.mark.parametrize("kind, call, error, message", CATALOGUE, ids=[entry[0] for entry in CATALOGUE])
def test_bad_input_gets_a_clear_error(kind, call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path) if call.__code__.co_argcount else call()


def test_the_catalogue_covers_at_least_25_kinds():
    assert len(CATALOGUE) >= 25


def test_odd_but_valid_inputs_are_handled():
    # An empty batch and a batch of padding only: outputs of the input's shape, all zeros.
    for ids, mask in ((torch.zeros(0, 5, dtype=torch.long), None),
                      (torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))):
        out = encoder(ids, mask)
        assert out.shape == (*ids.shape, 64) and not out.any()
    # A padding-only row beside a real one: its outputs are zeros, the real row's are not.
    out = encoder(torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    assert not out[1].any() and out[0, :3].abs().sum() > 0 and not out[0, 3:].any()
    # A window wider than the sequence is dense attention.
    q, k, v = qkv(1, 2, 64, 64)
    out = block_sparse_attention(q, k, v, layouts.sliding_window(64, 1000, 32), window=1000)
    expected = block_sparse_attention_reference(q.double(), k.double(), v.double(), layouts.from_block_mask(torch.ones(2, 2, dtype=torch.bool), 32))
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_odd_but_valid_global_tokens_are_handled():
    q, k, v = qkv(2, 2, 64, 64)
    window = layouts.sliding_window(64, 8, 32)
    plain = block_sparse_attention(q, k, v, window, window=8)
    # No global token anywhere: the plain result, bit for bit.
    none = block_sparse_attention(q, k, v, window, window=8, global_tokens=torch.zeros(2, 64, dtype=torch.bool))
    assert torch.equal(none, plain)
    # Every token global: dense attention, whatever the layout.
    every = block_sparse_attention(q, k, v, window, window=8, global_tokens=torch.ones(2, 64, dtype=torch.bool))
    dense = block_sparse_attention_reference(q.double(), k.double(), v.double(), layouts.dense(64, 32))
    assert ((every.double() - dense).abs().max() / dense.abs().max()).item() <= 1e-5
    # An empty batch, padded and varlen.
    q0, k0, v0 = qkv(0, 2, 64, 64)
    assert block_sparse_attention(q0, k0, v0, window, global_tokens=torch.zeros(0, 64, dtype=torch.bool)).shape == q0.shape
    q0, k0, v0 = qkv(0, 2, 64)
    out = block_sparse_attention(q0, k0, v0, window, cu_seqlens=cu(0, 0), global_tokens=torch.zeros(0, dtype=torch.bool))
    assert out.shape == q0.shape
