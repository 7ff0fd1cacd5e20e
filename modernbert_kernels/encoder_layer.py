"""Pre-norm encoder layers of packed tokens in one native call: ModernBERT's layer (LayerNorm, Wqkv,
RoPE on q and k, block-sparse attention, Wo plus the residual; LayerNorm, a gated Wi, Wo plus the
residual), layer after layer, where the linears run this library's own GEMMs: the streamed GEMM
(fp32 and bf16, at a few tokens; streamed_gemm.py) or the int8 linear's (int8.py)
(csrc/cpu/encoder_layer_op.cpp).

Why one call: at 16 tokens each of a layer's seven op calls from Python costs 30-50 us more than
its kernel, because every streamed weight evicts the interpreter's and the dispatcher's working set
from the caches; half of a 16-token bf16 forward was that (NOTES "The streamed GEMM's bf16 on AMX
tiles, and one call a layer"). A call a layer still paid ~80 us a layer for the same reason (bf16
query 14.3 -> 12.6 ms with all 22 layers in one call; NOTES "All the layers in one call"). The
native layers call the same kernels (the GEMMs with their LayerNorm prologues and epilogues, RoPE,
the attention) from C++, in the same order, so the output has the same bits as those ops called
one by one. ``encoder_layer_reference`` is one layer's float64 oracle for the float linears, from
the unpacked weights."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from . import native
from ._ops import ops
from .attention import NativeAttentionArguments
from .block_sparse_layout import BlockSparseLayout
from .reference import block_sparse_attention_reference, rotary_embedding_reference
from .streamed_gemm import GATES


class NativeLinear(NamedTuple):
    """A linear as the native layer takes it: ``weights`` (packed,) for the streamed GEMM
    (``pack_streamed_weight``; Wi's gated), or (w_q, w_scale, w_packed) or (w_q, w_scale, w_packed,
    smooth) for the int8 linear (``int8_pack_weight``); its bias (fp32 for the streamed GEMM) or None."""

    weights: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None


class EncoderLayer(NamedTuple):
    """A layer's operands as the native call takes them. LayerNorm parameters in fp32, or None (a
    weight of None: no LayerNorm there, as in ModernBERT's first layer; an int8 linear folds only
    a LayerNorm without bias). ``qkv_dtype``: what Wqkv writes and the attention computes in (an
    int8 layer's may be bf16; a streamed one's is the hidden states' dtype)."""

    attn_norm_weight: torch.Tensor | None
    attn_norm_bias: torch.Tensor | None
    wqkv: NativeLinear
    qkv_dtype: torch.dtype
    heads: int
    wo: NativeLinear
    mlp_norm_weight: torch.Tensor | None
    mlp_norm_bias: torch.Tensor | None
    wi: NativeLinear
    wi_activation: str  # a streamed_gemm.GATES name, or the int8 epilogue's ("geglu")
    intermediate: int
    wo2: NativeLinear
    eps: float  # both LayerNorms'


def encoder_layers(hidden: torch.Tensor, layers: Sequence[EncoderLayer], rope: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   attention: Sequence[NativeAttentionArguments]) -> torch.Tensor:
    """``layers`` one after the other on ``hidden`` [tokens, hidden_size] (fp32 or bf16, contiguous;
    the packed sequences of the attention's cu_seqlens), in one native call: layer i with RoPE by
    ``rope[i]`` = (cos, sin) [tokens, head_dim / 2] (fp32) and the attention as ``bind_attention``
    bound it (``attention[i]``: its ``run.native_arguments``). The layers share their ``qkv_dtype``,
    ``wi_activation`` and ``eps``, and the attentions their cu_seqlens and max_seqlen. The C++ CPU
    kernels only."""
    if not native.cpu_status()[0]:
        raise RuntimeError(f"the native encoder layer needs the C++ CPU kernels: {native.cpu_status()[1]}")
    if not (len(layers) == len(rope) == len(attention)):
        raise ValueError(f"one rope and one attention a layer: {len(layers)} layers, {len(rope)} ropes, "
                         f"{len(attention)} attentions")
    if not layers:
        raise ValueError("no layers given")
    first, lengths = layers[0], attention[0]
    if any((layer.qkv_dtype, layer.wi_activation, layer.eps) != (first.qkv_dtype, first.wi_activation, first.eps)
           for layer in layers):
        raise ValueError("the layers of one call must share qkv_dtype, wi_activation and eps")
    if any(a.cu_seqlens is not lengths.cu_seqlens or a.max_seqlen != lengths.max_seqlen for a in attention):
        raise ValueError("the attentions of one call must share cu_seqlens (the same tensor) and max_seqlen")
    norms, weights, weight_counts, biases = [], [], [], []
    for layer in layers:
        norms += (layer.attn_norm_weight, layer.attn_norm_bias, layer.mlp_norm_weight, layer.mlp_norm_bias)
        for linear in (layer.wqkv, layer.wo, layer.wi, layer.wo2):
            weights += linear.weights
            weight_counts.append(len(linear.weights))
            biases.append(linear.bias)
    return ops.encoder_layers_native(
        hidden, norms, weights, weight_counts, biases, [layer.heads for layer in layers],
        [layer.intermediate for layer in layers], [cos for cos, _ in rope], [sin for _, sin in rope],
        [a.row_offsets for a in attention], [a.col_indices for a in attention], [a.block_size for a in attention],
        [a.window_left for a in attention], [a.window_right for a in attention], [a.scale for a in attention],
        lengths.cu_seqlens, lengths.max_seqlen, first.qkv_dtype, first.wi_activation, first.eps)


def encoder_layer_reference(hidden: torch.Tensor, weights: dict[str, torch.Tensor | None], heads: int, gate: str,
                            eps: float, cos: torch.Tensor, sin: torch.Tensor, layout: BlockSparseLayout,
                            window: int | None, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """What ``encoder_layer`` computes with streamed linears, in float64 from the unpacked weights
    (``weights``: attn_norm_weight, attn_norm_bias, wqkv, wqkv_bias, wo, wo_bias, mlp_norm_weight,
    mlp_norm_bias, wi, wi_bias, wo2, wo2_bias; a missing or None entry is no bias, or no LayerNorm)."""
    def get(name):
        value = weights.get(name)
        return None if value is None else value.double()

    def normed(x, prefix):
        weight = get(f"{prefix}_norm_weight")
        return x if weight is None else F.layer_norm(x, x.shape[-1:], weight, get(f"{prefix}_norm_bias"), eps)

    x = hidden.double()
    tokens = x.shape[0]
    qkv = F.linear(normed(x, "attn"), get("wqkv"), get("wqkv_bias")).view(tokens, 3, heads, -1)
    q, k = (rotary_embedding_reference(qkv[:, i], cos, sin) for i in range(2))
    attended = block_sparse_attention_reference(q, k, qkv[:, 2], layout, window=window, cu_seqlens=cu_seqlens)
    x = x + F.linear(attended.reshape(tokens, -1), get("wo"), get("wo_bias"))
    activated, gated = F.linear(normed(x, "mlp"), get("wi"), get("wi_bias")).chunk(2, dim=-1)
    return x + F.linear(GATES[gate](activated) * gated, get("wo2"), get("wo2_bias"))
