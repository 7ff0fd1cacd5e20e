"""FrozenEncoder: a ModernBertModel's inference forward with the model's weights taken as fixed.

A short input spends more time in Python than in kernels: at 16 tokens the int8 encoder's kernels
take ~10 ms and its forward ~17 ms on a 2-core Xeon, where each of its ~130 op calls repeats the
checks and choices the last layer's call made (shapes, dtypes, backends, the GEMM, the packed
weight's lookup), through the modules' calls. A FrozenEncoder makes those once: each linear is
bound (``Linear.bind``, ``Int8Linear.bind``) once per token regime, and the attention
(``bind_attention``) once per forward for all the layers of one kind. What runs is what
``model(input_ids, attention_mask)`` runs, call for call, so the outputs are the same bits
(tests/test_frozen.py); NOTES "A frozen encoder" has the times.

What it does not follow, as ``torch.jit.freeze`` does not: the modules are those of the model when
frozen (later replacements are not seen), hooks do not run, and the GEMM choices are made at the
first call of each token regime. Changing a weight in place after freezing makes the next call
raise, rather than run on stale packed copies.
"""

from __future__ import annotations

import torch
from torch import nn

from modernbert_kernels import Int8Linear, bind_attention, rotary_embedding
from modernbert_kernels.cpu_linear import Linear, timing_tokens
from modernbert_kernels.rotary import ROTARY

from .model import ModernBertModel, rotary_cos_sin
from .padding import PackedBatch


class FrozenEncoder:
    """``frozen(input_ids, attention_mask)`` is ``model(input_ids, attention_mask)`` in inference
    mode (same checks, same output), with fewer Python calls between the kernels."""

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
        self._layers = [(index, layer, layer.attn, layer.mlp) for index, layer in model.layer_sequence()]
        self._versions = [(t, t._version) for t in (*model.parameters(), *model.buffers())]
        self._bound: dict = {}  # (layer index, which linear, token regime) -> run(x, residual)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for tensor, version in self._versions:
            if tensor._version != version:
                raise RuntimeError("the model's weights changed in place after it was frozen; make a new FrozenEncoder")
        with torch.inference_mode():
            return self.model.forward(input_ids, attention_mask, self._forward_packed)

    def _linear(self, key, linear, x: torch.Tensor, **arguments):
        """linear's bound run for this call: bound on the first call of its token regime."""
        key = (*key, timing_tokens(x.shape[0]))
        run = self._bound.get(key)
        if run is None:
            run = self._bound[key] = linear.bind(x, **arguments)
        return run(x, arguments.get("residual"))

    def _forward_packed(self, input_ids: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        model, config = self.model, self.model.config
        hidden = model.embeddings(input_ids)
        tokens = hidden.shape[0]
        rotary, attention = {}, {}
        # An attention-only backend ("reference") turns q and k with the device's default.
        rope_backend = model.attention_backend if model.attention_backend in ROTARY.backends else None
        for index, layer, attn, mlp in self._layers:
            theta = config.rope_theta(index)
            if theta not in rotary:
                rotary[theta] = rotary_cos_sin(batch.positions, config.head_dim, theta, hidden.dtype)
            # The attention sublayer (ModernBertAttention.forward).
            qkv = self._normed_linear((index, "Wqkv"), layer.attn_norm, attn.Wqkv, hidden, attn.attention_dtype)
            qkv = qkv.view(tokens, 3, attn.num_heads, attn.head_dim)
            rotary_embedding(qkv[:, :2], *rotary[theta], inplace=True, backend=rope_backend)
            q, k, v = qkv.unbind(1)
            if attn.attention_dtype is not None and attn.attention_dtype != q.dtype:
                q, k, v = (t.to(attn.attention_dtype) for t in (q, k, v))
            is_global = config.is_global(index)
            kind = (is_global, attn.num_heads)
            if kind not in attention:
                attention[kind] = bind_attention(
                    q, k, v, model._layout(is_global, batch.max_seqlen),
                    window=None if is_global else config.sliding_window, cu_seqlens=batch.cu_seqlens,
                    max_seqlen=batch.max_seqlen, backend=model.attention_backend)
            out = attention[kind](q, k, v).reshape(tokens, -1)
            hidden = self._projection((index, "attn.Wo"), attn.Wo, out, hidden)
            # The MLP sublayer (ModernBertMLP.forward).
            if isinstance(mlp.Wi, Linear):
                activated = self._linear((index, "Wi"), mlp.Wi, _normed(layer.mlp_norm, hidden), gated=mlp.activation)
            else:
                activated = self._normed_linear((index, "Wi"), layer.mlp_norm, mlp.Wi, hidden, None)
                if mlp.Wi.activation != "geglu":
                    activated, gate = activated.chunk(2, dim=-1)
                    activated = mlp.act(activated) * gate
            hidden = self._projection((index, "mlp.Wo"), mlp.Wo, activated, hidden)
        return model.final_norm(hidden)

    def _normed_linear(self, key, norm: nn.Module, linear, hidden: torch.Tensor, int8_out_dtype):
        """model.normed_linear: an Int8Linear folds a bias-free LayerNorm into its quantization."""
        if isinstance(linear, Int8Linear):
            if isinstance(norm, nn.LayerNorm) and norm.bias is None:
                return self._linear(key, linear, hidden, norm_weight=norm.weight, eps=norm.eps, out_dtype=int8_out_dtype)
            return self._linear(key, linear, _normed(norm, hidden), out_dtype=int8_out_dtype)
        return self._linear(key, linear, _normed(norm, hidden))

    def _projection(self, key, linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """model.project_with_residual without dropout: the residual added by the linear."""
        if isinstance(linear, Int8Linear):
            return self._linear(key, linear, x, out_dtype=residual.dtype, residual=residual)
        return self._linear(key, linear, x.to(residual.dtype), residual=residual)


def _normed(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, nn.Identity):
        return hidden
    return norm(hidden)
