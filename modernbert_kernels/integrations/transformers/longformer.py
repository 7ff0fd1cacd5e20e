"""Longformer and LED (its encoder) on block_sparse_attention: a sliding window of
``attention_window / 2`` tokens each side, plus global tokens chosen per example.

transformers' LongformerSelfAttention computes the window as overlapping chunks of dense scores and
the globals with index gymnastics; here the window and the global keys are one
``block_sparse_attention(..., global_tokens=)`` call, and the global rows (which Longformer computes
with their own query_global / key_global / value_global projections) replace the call's rows. The
masks are transformers': padded keys are seen by no one and padded queries output 0; a global
token sees every real key and every query sees it, once (not again through the window).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...attention import block_sparse_attention
from ...global_attention import GlobalTokens
from .attention import BLOCK_SIZE, layout_for

# transformers' class names of the modules swapped (LED's encoder copies Longformer's).
SWAPPED = ("LongformerSelfAttention", "LEDEncoderSelfAttention")


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, seq, heads * d] -> [batch, heads, seq, d]."""
    return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


class LongformerSelfAttention(nn.Module):
    """Drop-in for transformers' LongformerSelfAttention and LEDEncoderSelfAttention: the same
    parameters under the same names (so state dicts load either way), the same forward contract."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim, self.embed_dim = original.num_heads, original.head_dim, original.embed_dim
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(self, name, getattr(original, name))
        self.dropout = original.dropout
        self.layer_id = original.layer_id
        self.one_sided_attn_window_size = original.one_sided_attn_window_size
        self.config = original.config

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                is_global_attn=None, output_attentions=False):
        """hidden_states [batch, seq, embed] (seq a multiple of the attention window: the model pads
        it); ``is_index_masked`` / ``is_index_global_attn`` [batch, seq] as LongformerModel makes them."""
        if output_attentions:
            raise NotImplementedError(
                "replace_attention: output_attentions=True is not served; the kernels never form attention "
                "probabilities. Run the model without replace_attention to inspect them.")
        if self.training and self.dropout > 0:
            raise NotImplementedError(
                f"replace_attention: attention dropout ({self.dropout}) is not implemented by the kernels; set "
                "config.attention_probs_dropout_prob (LED: config.attention_dropout) to 0 before building the model "
                "to train it")
        batch, seq_len, _ = hidden_states.shape
        q, k, v = (_heads(proj(hidden_states), self.num_heads) for proj in (self.query, self.key, self.value))
        real = ~is_index_masked if is_index_masked is not None else None
        global_tokens = is_index_global_attn if is_global_attn else None
        window = self.one_sided_attn_window_size
        layout = layout_for(-(-seq_len // BLOCK_SIZE), window, False, q.device)
        out = block_sparse_attention(q, k, v, layout, window=window, key_padding_mask=real,
                                     global_tokens=global_tokens)
        if global_tokens is not None:
            out = self._replace_global_rows(out, hidden_states, global_tokens, real)
        if real is not None:  # transformers zeroes the attention of padded queries
            out = out * real[:, None, :, None]
        return (out.transpose(1, 2).reshape(batch, seq_len, self.embed_dim),)

    def _replace_global_rows(self, out, hidden_states, global_tokens, real):
        """Global queries through Longformer's global projections, over every real key."""
        found = GlobalTokens.find(global_tokens, real)
        if found is None:
            return out
        gathered = found.gather(hidden_states[:, None])[:, 0]  # [batch, G, embed]
        q, k, v = (_heads(projection(x), self.num_heads) for projection, x in (
            (self.query_global, gathered), (self.key_global, hidden_states), (self.value_global, hidden_states)))
        return found.replace_rows(out, found.attend(q, k, v, 1.0 / math.sqrt(self.head_dim)))


def swap(model: nn.Module) -> int:
    """Replace every Longformer / LED encoder self-attention in ``model``; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in SWAPPED:
                setattr(parent, name, LongformerSelfAttention(child))
                swapped += 1
    return swapped
