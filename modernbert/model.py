"""The ModernBERT encoder on modernbert_kernels, in the order data flows.

Same math as transformers' ModernBertModel (fused Wqkv, RoPE with a global and a local theta,
alternating global and sliding-window layers, GeGLU MLP, LayerNorm without bias, final norm) and
the same parameter names, so Hugging Face checkpoints load as they are. The batch is packed into
one token stream before the first layer (padding.pack) and every attention call is varlen, so no
FLOP is spent on padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modernbert_kernels import Int8Linear, block_sparse_attention, layouts

from .config import ModernBertConfig
from .loading import PretrainedMixin
from .padding import PackedBatch, pack, unpack

# 64-token blocks: a sliding window of 64 each side touches 3 blocks per row.
ATTENTION_BLOCK = 64

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


def normed_linear(norm: nn.Module, linear: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """linear(norm(hidden)); an Int8Linear folds a bias-free LayerNorm into its quantization pass,
    so the normalized activations are never written out."""
    if isinstance(linear, Int8Linear) and isinstance(norm, nn.LayerNorm) and norm.bias is None:
        return linear(hidden, norm_weight=norm.weight, eps=norm.eps)
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
    """cos, sin [tokens, head_dim] for RoPE with base ``theta`` (half-split layout, as transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions.float()[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim]; computed in fp32 like transformers, returned in x's dtype."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class ModernBertAttention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.is_global = config.is_global(layer)
        self.window = None if self.is_global else config.sliding_window
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.out_drop = nn.Dropout(config.attention_dropout) if config.attention_dropout > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, norm: nn.Module, rotary, batch: PackedBatch, layout,
                backend=None) -> torch.Tensor:
        qkv = normed_linear(norm, self.Wqkv, hidden).view(hidden.shape[0], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = block_sparse_attention(q, k, v, layout, window=self.window, cu_seqlens=batch.cu_seqlens,
                                     max_seqlen=batch.max_seqlen, backend=backend)
        return self.out_drop(self.Wo(out.reshape(hidden.shape[0], -1)))


class ModernBertMLP(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_activation)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        projected = normed_linear(norm, self.Wi, hidden)
        if getattr(self.Wi, "activation", None) == "geglu":  # an Int8Linear with GeGLU in its epilogue
            return self.Wo(self.drop(projected))
        activated, gate = projected.chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(activated) * gate))


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        # The embeddings end with a LayerNorm, so the first layer does not normalize again.
        self.attn_norm = nn.Identity() if layer == 0 else layer_norm(config)
        self.attn = ModernBertAttention(config, layer)
        self.mlp_norm = layer_norm(config)
        self.mlp = ModernBertMLP(config)

    def forward(self, hidden, rotary, batch, layout, backend=None):
        hidden = hidden + self.attn(hidden, self.attn_norm, rotary, batch, layout, backend)
        return hidden + self.mlp(hidden, self.mlp_norm)


class ModernBertModel(PretrainedMixin, nn.Module):
    """input_ids [batch, seq] (+ attention_mask) -> last hidden state [batch, seq, hidden]."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = layer_norm(config)
        self.attention_backend: str | None = None  # None: the fastest for the device
        self._layouts: dict = {}

    def _layout(self, is_global: bool, max_seqlen: int):
        num_blocks = max(1, -(-max_seqlen // ATTENTION_BLOCK))
        key = (is_global, num_blocks)
        if key not in self._layouts:
            tokens = num_blocks * ATTENTION_BLOCK
            if is_global:
                self._layouts[key] = layouts.from_block_mask(
                    torch.ones(num_blocks, num_blocks, dtype=torch.bool), ATTENTION_BLOCK
                )
            else:
                self._layouts[key] = layouts.sliding_window(tokens, self.config.sliding_window, ATTENTION_BLOCK)
        return self._layouts[key]

    def forward_packed(self, input_ids: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """The encoder on a packed token stream: input_ids [total_tokens] -> [total_tokens, hidden]."""
        hidden = self.embeddings(input_ids)
        rotary = {}
        for layer_index, layer in enumerate(self.layers):
            theta = self.config.rope_theta(layer_index)
            if theta not in rotary:
                rotary[theta] = rotary_cos_sin(batch.positions, self.config.head_dim, theta, hidden.dtype)
            layout = self._layout(self.config.is_global(layer_index), batch.max_seqlen)
            hidden = layer(hidden, rotary[theta], batch, layout, self.attention_backend)
        return self.final_norm(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        batch = pack(attention_mask)
        packed = self.forward_packed(input_ids.reshape(-1)[batch.indices], batch)
        return unpack(packed, batch)
