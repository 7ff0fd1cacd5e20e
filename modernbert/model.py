"""The ModernBERT encoder on modernbert_kernels, in the order data flows.

Same math as transformers' ModernBertModel (fused Wqkv, RoPE with a global and a local theta,
alternating global and sliding-window layers, GeGLU MLP, LayerNorm without bias, final norm) and
the same parameter names, so Hugging Face checkpoints load as they are. The batch is packed into
one token stream before the first layer (padding.pack) and every attention call is varlen, so no
FLOP is spent on padding.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from modernbert_kernels import Int8Linear, block_sparse_attention, cpu_memory, layouts, rotary_embedding
from modernbert_kernels import cpu_linear
from modernbert_kernels.cpu_linear import GATED_ACTIVATIONS, Linear
from modernbert_kernels.rotary import ROTARY
from modernbert_kernels.streamed_gemm import GATES

from .config import ModernBertConfig
from .loading import PretrainedMixin
from .padding import PackedBatch, pack, unpack

# 64-token blocks: a sliding window of 64 each side touches 3 blocks per row.
ATTENTION_BLOCK = 64

ACTIVATIONS = {name: GATES[gate] for name, (gate, *_) in GATED_ACTIVATIONS.items()}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


def normed_linear(norm: nn.Module, linear: nn.Module, hidden: torch.Tensor,
                  int8_out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """linear(norm(hidden)); an Int8Linear folds a bias-free LayerNorm into its quantization pass,
    so the normalized activations are never written out, and writes ``int8_out_dtype`` (default:
    hidden's) from its epilogue."""
    if isinstance(linear, Int8Linear):
        if isinstance(norm, nn.LayerNorm) and norm.bias is None:
            return linear(hidden, norm_weight=norm.weight, eps=norm.eps, out_dtype=int8_out_dtype)
        return linear(norm(hidden), out_dtype=int8_out_dtype)
    return linear(norm(hidden))


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = layer_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """fp32 cos, sin [tokens, head_dim / 2] of RoPE with base ``theta`` (half-split pairs), rounded
    through ``dtype`` first as transformers' cos / sin tables are, so 16-bit models match it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    angles = positions.float()[:, None] * inv_freq
    return angles.cos().to(dtype).float(), angles.sin().to(dtype).float()


def rotary_backend(attention_backend: str | None) -> str | None:
    """The RoPE backend for an attention backend: the same one, or for an attention-only backend
    ("reference") the device's default."""
    return attention_backend if attention_backend in ROTARY.backends else None


class ModernBertAttention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        self.head_dim = config.head_dim
        pruned = set((config.pruned_heads or {}).get(layer, ()))
        # The original indices of the heads this layer still has (all of them unless pruned).
        self.heads = [h for h in range(config.num_attention_heads) if h not in pruned]
        if not self.heads:
            raise ValueError(f"layer {layer} has every head pruned")
        inner = len(self.heads) * self.head_dim
        self.Wqkv = Linear(config.hidden_size, 3 * inner, bias=config.attention_bias)
        self.Wo = Linear(inner, config.hidden_size, bias=config.attention_bias)
        self.out_drop = nn.Dropout(config.attention_dropout) if config.attention_dropout > 0 else nn.Identity()
        # Optional [num_heads] multipliers of the heads' outputs: head_importance() sets them to
        # ones that require grad, reading the gradient of the loss with respect to each head.
        self.head_gate: torch.Tensor | None = None
        # The dtype q, k, v enter the attention in (None: the hidden states'); quantize_int8 can set
        # bf16 so the attention's matmuls use bf16 units (AMX, tensor cores) in an int8 model.
        self.attention_dtype: torch.dtype | None = None

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor, norm: nn.Module, rotary, batch: PackedBatch, layout, window,
                backend=None) -> torch.Tensor:
        """hidden + the attention sublayer's output (the residual connection included)."""
        # In an int8 model with a bf16 attention, Wqkv's epilogue writes bf16 q, k, v and Wo
        # quantizes the bf16 output: no cast passes around the attention.
        qkv = normed_linear(norm, self.Wqkv, hidden, int8_out_dtype=self.attention_dtype)
        qkv = qkv.view(hidden.shape[0], 3, self.num_heads, self.head_dim)
        rope_backend = rotary_backend(backend)
        if qkv.requires_grad and torch.is_grad_enabled():
            q, k = rotary_embedding(qkv[:, :2], *rotary, backend=rope_backend).unbind(1)
        else:  # inference: q and k are turned where they are, no new [tokens, 2, heads, dim] tensor
            rotary_embedding(qkv[:, :2], *rotary, inplace=True, backend=rope_backend)
            q, k = qkv[:, 0], qkv[:, 1]
        v = qkv[:, 2]
        if self.attention_dtype is not None and self.attention_dtype != q.dtype:
            q, k, v = (t.to(self.attention_dtype) for t in (q, k, v))
        out = block_sparse_attention(q, k, v, layout, window=window, cu_seqlens=batch.cu_seqlens,
                                     max_seqlen=batch.max_seqlen, backend=backend)
        if self.head_gate is not None:
            out = out * self.head_gate[:, None].to(out.dtype)
        out = out.reshape(hidden.shape[0], -1)
        return project_with_residual(self.Wo, out, hidden, self.out_drop)

    @torch.no_grad()
    def prune(self, heads) -> None:
        """Remove the heads with these original indices: their rows of Wqkv, their columns of Wo."""
        if not isinstance(self.Wqkv, nn.Linear) or not isinstance(self.Wo, nn.Linear):
            raise TypeError("prune heads before quantize_int8: int8 layers cannot be sliced")
        unknown = set(heads) - set(self.heads)
        if unknown:
            raise ValueError(f"heads {sorted(unknown)} are not in this layer (it has {self.heads})")
        keep = [i for i, h in enumerate(self.heads) if h not in set(heads)]
        if not keep:
            raise ValueError("cannot prune every head of a layer")
        d, inner = self.head_dim, self.num_heads * self.head_dim
        columns = torch.cat([torch.arange(i * d, (i + 1) * d) for i in keep])
        rows = torch.cat([columns + part * inner for part in range(3)])  # q, k, v parts of Wqkv
        self.Wqkv = _sliced_linear(self.Wqkv, rows=rows)
        self.Wo = _sliced_linear(self.Wo, columns=columns)
        self.heads = [self.heads[i] for i in keep]
        self.head_gate = None


def _sliced_linear(linear: nn.Linear, rows=None, columns=None) -> Linear:
    weight = linear.weight
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, columns] if columns is not None else weight
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    sliced = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    sliced.weight.copy_(weight)
    if bias is not None:
        sliced.bias.copy_(bias)
    return sliced


class ModernBertMLP(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.Wi = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.activation = config.hidden_activation
        self.act = activation(config.hidden_activation)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """hidden + the MLP's output (the residual connection included)."""
        if isinstance(self.Wi, Linear):  # the activation and the product in the GEMMs' post-ops, where it can
            activated = self.Wi(norm(hidden), gated=self.activation)
        else:
            projected = normed_linear(norm, self.Wi, hidden)
            if getattr(self.Wi, "activation", None) == "geglu":  # an Int8Linear with GeGLU in its epilogue
                activated = projected
            else:
                activated, gate = projected.chunk(2, dim=-1)
                activated = self.act(activated) * gate
        return project_with_residual(self.Wo, self.drop(activated), hidden)


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        # The embeddings end with a LayerNorm, so the first layer does not normalize again.
        self.attn_norm = nn.Identity() if layer == 0 else layer_norm(config)
        self.attn = ModernBertAttention(config, layer)
        self.mlp_norm = layer_norm(config)
        self.mlp = ModernBertMLP(config)

    def forward(self, hidden, rotary, batch, layout, window, backend=None):
        hidden = self.attn(hidden, self.attn_norm, rotary, batch, layout, window, backend)
        return self.mlp(hidden, self.mlp_norm)


def project_with_residual(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                          dropout: nn.Module | None = None):
    """residual + dropout(linear(x)) in residual's dtype: a sublayer's output projection and its
    residual connection. Unless a dropout sits between them, an ``Int8Linear`` adds the residual in
    its GEMM's epilogue (x in any dtype: the epilogue writes residual's), and a ``Linear`` where that
    pays (bf16 on the CPU); otherwise the residual is added into the fresh output."""
    dropping = dropout is not None and dropout.training and not isinstance(dropout, nn.Identity)
    if isinstance(linear, Int8Linear):
        if not dropping:
            return linear(x, out_dtype=residual.dtype, residual=residual)
        out = linear(x, out_dtype=residual.dtype)
    elif isinstance(linear, Linear) and not dropping:
        return linear(x.to(residual.dtype), residual=residual)
    else:
        out = linear(x.to(residual.dtype))
    return cpu_linear.add_residual(out if dropout is None else dropout(out), residual)


class ModernBertModel(PretrainedMixin, nn.Module):
    """input_ids [batch, seq] (+ attention_mask) -> last hidden state [batch, seq, hidden].

    With ``config.num_hidden_groups`` (ALBERT-style sharing) ``layers`` holds one module per group
    and layer i runs ``layers[config.layer_group(i)]``, so shared weights are stored once.
    """

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        groups = config.num_hidden_groups or config.num_hidden_layers
        first_layer = {config.layer_group(i): i for i in reversed(range(config.num_hidden_layers))}
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, first_layer[g]) for g in range(groups))
        self.final_norm = layer_norm(config)
        self.attention_backend: str | None = None  # None: the fastest for the device
        # Recompute each layer's activations in the backward instead of storing them (training only).
        self.gradient_checkpointing = False
        self._layouts: dict = {}

    def layer_sequence(self):
        """(layer index, the module it runs) for every layer in order."""
        for i in range(self.config.num_hidden_layers):
            yield i, self.layers[self.config.layer_group(i)]

    def prune_heads(self, heads_to_prune: dict) -> None:
        """Remove attention heads: ``{layer: [original head indices]}``. Recorded in
        ``config.pruned_heads`` so save_pretrained / from_pretrained round-trip the smaller model."""
        if self.config.num_hidden_groups is not None:
            raise ValueError("pruning heads of a model with shared layers is not supported")
        pruned = dict(self.config.pruned_heads or {})
        for layer, heads in heads_to_prune.items():
            self.layers[int(layer)].attn.prune(list(heads))
            pruned[int(layer)] = sorted(set(pruned.get(int(layer), [])) | set(heads))
        self.config.pruned_heads = pruned

    def _layout(self, is_global: bool, max_seqlen: int):
        num_blocks = max(1, -(-max_seqlen // ATTENTION_BLOCK))
        key = (is_global, num_blocks)
        if key not in self._layouts:
            tokens = num_blocks * ATTENTION_BLOCK
            if is_global:
                self._layouts[key] = layouts.dense(tokens, ATTENTION_BLOCK)
            else:
                self._layouts[key] = layouts.sliding_window(tokens, self.config.sliding_window, ATTENTION_BLOCK)
        return self._layouts[key]

    @torch.compiler.disable
    def unpad(self, attention_mask: torch.Tensor) -> PackedBatch:
        """Pack the batch and build the layouts its longest sequence needs (cached per length).

        Everything that depends on the data's values happens here: under torch.compile the graph
        breaks at this call only, and the layers compile into one graph.
        """
        if attention_mask.device.type == "cpu":  # large activations stay resident between calls
            cpu_memory.keep_freed_memory()
        batch = pack(attention_mask)
        if batch.max_seqlen > self.config.max_position_embeddings:
            raise ValueError(f"a sequence of {batch.max_seqlen} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        for is_global in (False, True):
            self._layout(is_global, batch.max_seqlen)
        return batch

    def forward_packed(self, input_ids: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """The encoder on a packed token stream: input_ids [total_tokens] -> [total_tokens, hidden]."""
        hidden = self.embeddings(input_ids)
        rotary = {}
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer_index, layer in self.layer_sequence():
            theta = self.config.rope_theta(layer_index)
            if theta not in rotary:
                rotary[theta] = rotary_cos_sin(batch.positions, self.config.head_dim, theta, hidden.dtype)
            is_global = self.config.is_global(layer_index)
            layout = self._layout(is_global, batch.max_seqlen)
            window = None if is_global else self.config.sliding_window
            if checkpointing:
                hidden = torch.utils.checkpoint.checkpoint(
                    layer, hidden, rotary[theta], batch, layout, window, self.attention_backend, use_reentrant=False
                )
            else:
                hidden = layer(hidden, rotary[theta], batch, layout, window, self.attention_backend)
        return self.final_norm(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                forward_packed=None) -> torch.Tensor:
        """The batch packed, run through ``forward_packed(input_ids, batch)`` (default: this model's;
        FrozenEncoder passes its own), and unpacked."""
        forward_packed = forward_packed or self.forward_packed
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        batch = self.unpad(attention_mask)
        if batch.max_seqlen == 0:  # no real token (an empty batch, or padding only): all outputs are padding
            weight = self.embeddings.tok_embeddings.weight
            return weight.new_zeros(*input_ids.shape, self.config.hidden_size)
        packed = forward_packed(input_ids.reshape(-1)[batch.indices], batch)
        return unpack(packed, batch)
