"""FrozenEncoder: a ModernBertModel's inference forward with the model's weights taken as fixed.

A short input spends more time in Python than in kernels: at 16 tokens the int8 encoder's kernels
take ~10 ms and its forward ~17 ms on a 2-core Xeon, where each of its ~130 op calls repeats the
checks and choices the last layer's call made (shapes, dtypes, backends, the GEMM, the packed
weight's lookup), through the modules' calls. A FrozenEncoder makes those once: its linears are
bound (``Linear.bind``, ``Int8Linear.bind``) once per token regime, and the attention
(``bind_attention``) and RoPE (``bind_rotary``) once per forward for all the layers that share
them. What runs is what ``model(input_ids, attention_mask)`` runs, call for call, so the outputs
are the same bits (tests/test_frozen.py), with one exception: where a linear runs the streamed GEMM
(fp32 and bf16 at a few tokens), the LayerNorm in front of it runs in the GEMM's call, saving a
call a layer norm (its sums in another order: within 3e-7 in fp32, one bf16 rounding in bf16).
Where every linear of a layer runs this library's GEMMs, the layer runs natively, and all such
consecutive layers are one native call (encoder_layer.py). Where the layers could run so on the
streamed GEMM but the per-shape measurement chose another GEMM for some linear, the first call of
the token regime times both and keeps the faster (``_choose_layers``). NOTES "A frozen encoder" and
"All the layers in one call" have the times.

What it does not follow, as ``torch.jit.freeze`` does not: the modules are those of the model when
frozen (later replacements are not seen), hooks do not run, and the GEMM choices are made at the
first call of each token regime. Changing a weight in place after freezing makes the next call
raise, rather than run on stale packed copies.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modernbert_kernels import Int8Linear, bind_attention, bind_rotary
from modernbert_kernels.cpu_linear import GATED_ACTIVATIONS, Linear, layer_norm_prologue, timing_tokens
from modernbert_kernels.encoder_layer import EncoderLayer, encoder_layers

from .model import ModernBertModel, rotary_backend, rotary_cos_sin
from .padding import PackedBatch


class _BoundLayer(NamedTuple):
    """One encoder layer's calls for one token regime: each takes the hidden states (and the
    sublayer's input, for the output projections) and returns the next tensor."""

    qkv: Callable  # hidden -> [tokens, 3 x inner] q, k, v, normalized first
    attention_out: Callable  # (attention output, hidden) -> hidden + its projection
    mlp: Callable  # hidden -> the activated MLP input (normalized, projected, GeGLU)
    mlp_out: Callable  # (activated, hidden) -> hidden + its projection
    theta: float
    attention: tuple  # the kind of attention: (global, heads)
    heads: int
    head_dim: int
    attention_dtype: torch.dtype | None
    native: EncoderLayer | None  # the whole layer as one native call, where its linears run ours
    # The same with every float linear on the streamed GEMM whatever the per-shape measurement chose,
    # where the GEMM can (native itself where that is set): the regime's layer-level choice
    # (FrozenEncoder._choose_layers) weighs it.
    streamed_native: EncoderLayer | None
    # Linears (and whether gated) whose streamed copies were packed for streamed_native only.
    packed_for_choice: tuple


class FrozenEncoder:
    """``frozen(input_ids, attention_mask)`` is ``model(input_ids, attention_mask)`` in inference
    mode (same checks, same output up to the rounding of LayerNorms fused into streamed GEMMs), with
    fewer Python calls between the kernels."""

    def __init__(self, model: ModernBertModel):
        if not isinstance(model, ModernBertModel):
            raise TypeError(f"FrozenEncoder takes a ModernBertModel, got {type(model).__name__}")
        if model.training:
            raise ValueError("freeze a model in eval mode: a FrozenEncoder runs no dropout")
        for index, layer in model.layer_sequence():
            if layer.attn.head_gate is not None:
                raise ValueError(f"layer {index} has a head gate (head_importance); remove it before freezing")
            for name, linear in (("attn.Wqkv", layer.attn.Wqkv), ("attn.Wo", layer.attn.Wo),
                                 ("mlp.Wi", layer.mlp.Wi), ("mlp.Wo", layer.mlp.Wo)):
                if not isinstance(linear, (Linear, Int8Linear)):
                    raise TypeError(f"layer {index}'s {name} is a {type(linear).__name__}; a FrozenEncoder runs "
                                    "modernbert_kernels' Linear and Int8Linear")
        self.model = model
        self._layers = list(model.layer_sequence())
        self._versions = [(t, t._version) for t in (*model.parameters(), *model.buffers())]
        self._bound: dict[int, list[_BoundLayer]] = {}  # per token regime (timing_tokens)
        # The last forward's RoPE tables and native attention arguments, for a next batch with the
        # same lengths (cos / sin) or longest length (the attention): a stream of queries of one
        # length recomputes neither (0.3 and 0.15 ms of a 12 ms bf16 16-token query on a 2-core Xeon).
        self._last_rope: dict[tuple, tuple] = {}  # (theta, head_dim, dtype) -> (lengths, (cos, sin))
        self._last_native_attention: dict[tuple, tuple] = {}  # (kind, dtype, backend) -> (max_seqlen, arguments)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for tensor, version in self._versions:
            if tensor._version != version:
                raise RuntimeError("the model's weights changed in place after it was frozen; make a new FrozenEncoder")
        with torch.inference_mode():
            return self.model.forward(input_ids, attention_mask, self._forward_packed)

    def _forward_packed(self, input_ids: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        model, config = self.model, self.model.config
        hidden = model.embeddings(input_ids)
        tokens = hidden.shape[0]
        regime = timing_tokens(tokens)
        layers = self._bound.get(regime)
        angles, rotary, attention = {}, {}, {}  # per forward: the positions and lengths are this batch's
        lengths = None

        def cos_sin(layer):
            nonlocal lengths
            found = angles.get(layer.theta)
            if found is None:
                # A token's position is its index in its sequence: the lengths make the tables.
                lengths = lengths or tuple(batch.cu_seqlens.tolist())
                key = (layer.theta, layer.head_dim, hidden.dtype)
                last = self._last_rope.get(key)
                if last is None or last[0] != lengths:
                    last = self._last_rope[key] = (lengths, rotary_cos_sin(batch.positions, layer.head_dim, layer.theta,
                                                                           hidden.dtype))
                found = angles[layer.theta] = last[1]
            return found

        def bound_attention(layer, q, k, v):
            attend = attention.get(layer.attention)
            if attend is None:
                is_global = layer.attention[0]
                attend = attention[layer.attention] = bind_attention(
                    q, k, v, model._layout(is_global, batch.max_seqlen),
                    window=None if is_global else config.sliding_window, cu_seqlens=batch.cu_seqlens,
                    max_seqlen=batch.max_seqlen, backend=model.attention_backend)
            return attend

        native_attentions = {}  # per kind of attention: its native arguments, or None

        def native_attention(layer):
            key = layer.attention
            if key not in native_attentions:
                # The arguments depend on the batch through its longest length (the layout) and
                # its cu_seqlens (checked by the native call itself).
                last_key = (key, layer.native.qkv_dtype, model.attention_backend)
                last = self._last_native_attention.get(last_key)
                if last is None or last[0] != batch.max_seqlen:  # bind_attention reads no values of q, k, v
                    sample = hidden.new_empty(tokens, 3, layer.heads, layer.head_dim, dtype=layer.native.qkv_dtype)
                    last = self._last_native_attention[last_key] = (
                        batch.max_seqlen, bound_attention(layer, *sample.unbind(1)).native_arguments)
                native_attentions[key] = last[1] and last[1]._replace(cu_seqlens=batch.cu_seqlens)
            return native_attentions[key]

        def run_layers(layers, hidden):
            index = 0
            while index < len(layers):
                # A run of layers that run natively and share what one native call shares: one call.
                run = []
                for layer in layers[index:]:
                    if layer.native is None or native_attention(layer) is None or (run and (
                            layer.native.qkv_dtype, layer.native.wi_activation, layer.native.eps) != (
                            run[0].native.qkv_dtype, run[0].native.wi_activation, run[0].native.eps)):
                        break
                    run.append(layer)
                if run:
                    hidden = encoder_layers(hidden, [layer.native for layer in run], [cos_sin(layer) for layer in run],
                                            [native_attention(layer) for layer in run])
                    index += len(run)
                    continue
                layer = layers[index]
                index += 1
                qkv = layer.qkv(hidden).view(tokens, 3, layer.heads, layer.head_dim)
                turn = rotary.get((layer.theta, layer.heads))
                if turn is None:
                    turn = rotary[layer.theta, layer.heads] = bind_rotary(
                        qkv[:, :2], *cos_sin(layer), backend=rotary_backend(model.attention_backend))
                turn(qkv[:, :2])
                q, k, v = qkv.unbind(1)
                if layer.attention_dtype is not None and layer.attention_dtype != q.dtype:
                    q, k, v = (t.to(layer.attention_dtype) for t in (q, k, v))
                hidden = layer.attention_out(bound_attention(layer, q, k, v)(q, k, v).reshape(tokens, -1), hidden)
                hidden = layer.mlp_out(layer.mlp(hidden), hidden)
            return hidden

        if layers is None:
            layers = self._bound[regime] = self._choose_layers(
                [self._bind(index, layer, hidden, regime) for index, layer in self._layers], run_layers, hidden)
        hidden = run_layers(layers, hidden)
        return model.final_norm(hidden)

    @staticmethod
    def _choose_layers(layers: list[_BoundLayer], run_layers: Callable, hidden: torch.Tensor) -> list[_BoundLayer]:
        """The layers as bound, or with every layer that could run natively on the streamed GEMM
        doing so, whichever runs ``hidden`` through them faster (``fastest``). Each linear's GEMM is
        measured on its own (cpu_linear.cpu_gemm), but running natively saves each layer's op calls
        (1.2-1.3x a 16-token forward), which that measurement does not see; and a per-shape timing
        that flips under load (a busy machine chose oneDNN for one bf16 shape at 16 tokens) would take
        every layer off the native call. Timed once per token regime, where the two differ."""
        if not any(layer.native is None and layer.streamed_native is not None for layer in layers):
            return layers
        streamed = [layer._replace(native=layer.streamed_native) for layer in layers]  # native where it was
        if fastest([lambda: run_layers(layers, hidden), lambda: run_layers(streamed, hidden)]) == 1:
            return streamed
        for layer in layers:  # a copy of the weights packed for the timing only is not kept
            for linear, gated in layer.packed_for_choice:
                linear.release_streamed_copy(gated)
        return [layer._replace(streamed_native=None, packed_for_choice=()) for layer in layers]

    def _bind(self, index: int, layer: nn.Module, hidden: torch.Tensor, regime: int) -> _BoundLayer:
        """layer's calls for inputs like hidden with ``regime`` tokens, as ModernBertAttention and
        ModernBertMLP make them (model.normed_linear, model.project_with_residual)."""
        attn, mlp = layer.attn, layer.mlp

        def sample(features: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            # What a bound call depends on: dtype, device, and the token count's regime.
            return torch.empty(regime, features, dtype=dtype or hidden.dtype, device=hidden.device)

        hidden_sample = sample(hidden.shape[1])
        attention_dtype = attn.attention_dtype or hidden.dtype
        inner = attn.num_heads * attn.head_dim
        qkv = _normed_linear(layer.attn_norm, attn.Wqkv, hidden_sample, attn.attention_dtype)
        attention_out = _projection(attn.Wo, sample(inner, attention_dtype), hidden_sample)
        if isinstance(mlp.Wi, Linear):
            run = mlp.Wi.bind(hidden_sample, gated=mlp.activation, norm=layer.mlp_norm)

            def activated(hidden):
                return run(hidden, None)
        else:
            projected = _normed_linear(layer.mlp_norm, mlp.Wi, hidden_sample, None)
            if mlp.Wi.activation == "geglu":
                activated = projected
            else:
                def activated(hidden):
                    value, gate = projected(hidden).chunk(2, dim=-1)
                    return mlp.act(value) * gate
        mlp_out = _projection(mlp.Wo, sample(mlp.Wo.in_features), hidden_sample)
        config = self.model.config
        attended_sample = sample(inner, attention_dtype)
        native = streamed_native = _native_layer(layer, hidden_sample, attended_sample)
        packed_for_choice = ()
        if native is None:
            linears = [(linear, linear is mlp.Wi) for linear in (attn.Wqkv, attn.Wo, mlp.Wi, mlp.Wo)
                       if isinstance(linear, Linear)]
            unpacked = [(linear, gated) for linear, gated in linears if not linear.has_streamed_copy(gated)]
            streamed_native = _native_layer(layer, hidden_sample, attended_sample, measured=False)
            packed_for_choice = tuple((linear, gated) for linear, gated in unpacked if linear.has_streamed_copy(gated))
            if streamed_native is None:  # some linear could not stream: the others' copies are of no use
                for linear, gated in packed_for_choice:
                    linear.release_streamed_copy(gated)
                packed_for_choice = ()
        return _BoundLayer(qkv, attention_out, activated, mlp_out, config.rope_theta(index),
                           (config.is_global(index), attn.num_heads), attn.num_heads, attn.head_dim,
                           attn.attention_dtype, native, streamed_native, packed_for_choice)


def _native_layer(layer: nn.Module, hidden: torch.Tensor, attended: torch.Tensor,
                  measured: bool = True) -> EncoderLayer | None:
    """The layer as one native call (encoder_layer.py), where for inputs like these each of its
    linears runs the streamed GEMM or the C++ int8 linear, its norms are LayerNorms they can take
    (with one eps) or nothing, its attention is computed in hidden's dtype (or, int8, the one Wqkv
    writes) and its MLP is gated in the GEMM's epilogue; else None. ``measured=False``: each float
    linear on the streamed GEMM wherever it can run it (``Linear.native_operands``)."""
    attn, mlp = layer.attn, layer.mlp
    linears = (attn.Wqkv, attn.Wo, mlp.Wi, mlp.Wo)
    qkv_dtype = attn.attention_dtype or hidden.dtype
    inputs = (hidden, attended, hidden, hidden.new_empty(hidden.shape[0], mlp.Wo.in_features))
    operands = []
    for linear, x in zip(linears, inputs):
        if isinstance(linear, Linear):
            if qkv_dtype != hidden.dtype:  # the streamed GEMM writes its input's dtype
                return None
            operands.append(linear.native_operands(x, gated=linear is mlp.Wi, measured=measured))
        elif isinstance(linear, Int8Linear):
            operands.append(linear.native_operands(x))
        else:
            return None
    if None in operands:
        return None
    if isinstance(mlp.Wi, Linear):
        if mlp.activation not in GATED_ACTIVATIONS:
            return None
        wi_activation = GATED_ACTIVATIONS[mlp.activation][0]
    elif mlp.Wi.activation == "geglu":
        wi_activation = "geglu"
    else:
        return None
    norms, eps = [], set()
    for norm, linear in ((layer.attn_norm, attn.Wqkv), (layer.mlp_norm, mlp.Wi)):
        if isinstance(norm, nn.Identity):
            norms.append((None, None))
            continue
        prologue = layer_norm_prologue(norm)
        if prologue is None or (isinstance(linear, Int8Linear) and prologue["norm_bias"] is not None):
            return None  # int8 folds a bias-free LayerNorm only
        norms.append((prologue["norm_weight"], prologue["norm_bias"]))
        eps.add(prologue["eps"])
    if len(eps) > 1:
        return None
    wqkv, wo, wi, wo2 = operands
    return EncoderLayer(*norms[0], wqkv, qkv_dtype, attn.num_heads, wo, *norms[1], wi, wi_activation,
                        mlp.Wo.in_features, wo2, eps.pop() if eps else 1e-5)


def _normed(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """norm(hidden), a LayerNorm's without the module call (its hooks, which a FrozenEncoder does not run)."""
    if isinstance(norm, nn.Identity):
        return hidden
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(hidden)


def _normed_linear(norm: nn.Module, linear, hidden: torch.Tensor, int8_out_dtype) -> Callable:
    """model.normed_linear bound: an Int8Linear folds a bias-free LayerNorm into its quantization."""
    if isinstance(linear, Int8Linear) and isinstance(norm, nn.LayerNorm) and norm.bias is None:
        run = linear.bind(hidden, norm_weight=norm.weight, eps=norm.eps, out_dtype=int8_out_dtype)
        return lambda hidden: run(hidden, None)
    if isinstance(linear, Linear):
        run = linear.bind(hidden, norm=norm)
        return lambda hidden: run(hidden, None)
    run = linear.bind(hidden, out_dtype=int8_out_dtype)
    return lambda hidden: run(_normed(norm, hidden), None)


def _projection(linear, x: torch.Tensor, residual: torch.Tensor) -> Callable:
    """model.project_with_residual bound, without dropout: the residual added by the linear."""
    if isinstance(linear, Int8Linear):
        return linear.bind(x, out_dtype=residual.dtype, residual=residual)
    run = linear.bind(x.to(residual.dtype), residual=residual)
    return lambda x, residual: run(x.to(residual.dtype), residual)


def fastest(runs: list[Callable[[], object]], rounds: int = 3) -> int:
    """The index of the fastest of ``runs``: after a warm-up, ``rounds`` rounds calling each in
    turn, the minimum of each's times (a busy machine only adds time)."""
    times = [[] for _ in runs]
    for round_index in range(rounds + 1):
        for run, seconds in zip(runs, times):
            start = time.perf_counter()
            run()
            if round_index:
                seconds.append(time.perf_counter() - start)
    return min(range(len(runs)), key=lambda index: min(times[index]))
