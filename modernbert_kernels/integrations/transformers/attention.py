"""The transformers attention backend: models that call transformers' attention interface (BERT,
ModernBERT, the ModernBERT decoder, Mistral, Gemma 3, ...) on block_sparse_attention.

    from modernbert_kernels.integrations.transformers import register
    register()
    model = AutoModel.from_pretrained(path, attn_implementation="modernbert_kernels")

Full attention runs on a dense block layout (causal layers on the lower-triangular one), sliding-
window layers on a sliding_window layout with the exact token window, bidirectional or causal as
the module says; the padding mask becomes ``key_padding_mask``. transformers passes the window in
flash-attention's convention (``sliding_window - 1`` tokens back, and ahead for encoders), which is
what its SDPA masks compute too. Queries shorter than the keys (decoding after a KV cache) have no
tiles to skip: they run in PyTorch's SDPA over the keys inside their window.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ... import layouts
from ...attention import block_sparse_attention

NAME = "modernbert_kernels"
BLOCK_SIZE = 64


@functools.lru_cache(maxsize=64)
def layout_for(num_blocks: int, window: int | None, causal: bool):
    """The layout of ``num_blocks`` blocks of BLOCK_SIZE for a layer (made once per shape; the
    Longformer adapter and the FlashAttention API share it). At least one block: a call with no
    tokens still needs a layout, and gets empty outputs."""
    num_blocks = max(1, num_blocks)
    if window is not None:
        return layouts.sliding_window(num_blocks * BLOCK_SIZE, window, BLOCK_SIZE, causal=causal)
    if causal:
        return layouts.causal(num_blocks * BLOCK_SIZE, BLOCK_SIZE)
    return layouts.dense(num_blocks * BLOCK_SIZE, BLOCK_SIZE)


def share_kv_heads(q, k, v, head_axis: int):
    """Grouped-query attention: each key/value head repeated for the query heads that share it."""
    repeat = q.shape[head_axis] // k.shape[head_axis]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, head_axis), v.repeat_interleave(repeat, head_axis)
    return k, v


def _attention_after_cache(query, key, value, key_padding_mask, window, scale):
    """Causal attention of queries shorter than the keys: the queries are the last of the keys'
    positions (a StaticCache's padding mask, shorter than its keys, ends at the last real one), and
    only the keys inside the window are read."""
    q_len, kv_len = query.shape[2], key.shape[2]
    extent = kv_len if key_padding_mask is None else key_padding_mask.shape[1]
    if key_padding_mask is not None and extent < kv_len:
        key_padding_mask = F.pad(key_padding_mask, (0, kv_len - extent), value=False)
    first_query = extent - q_len
    start = 0 if window is None else max(0, first_query - window)
    distance = (first_query + torch.arange(q_len, device=query.device))[:, None] - torch.arange(
        start, kv_len, device=query.device)[None, :]
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance <= window)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, start:]
    return F.scaled_dot_product_attention(query, key[:, :, start:], value[:, :, start:], attn_mask=visible,
                                          scale=scale)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, **kwargs):
    """transformers' attention-function contract: [batch, heads, seq, dim] in, ([batch, seq, heads, dim], None) out."""
    if softcap is not None:
        raise NotImplementedError(f"{NAME} has no attention logit soft-capping (softcap={softcap}, Gemma 2's "
                                  "attn_logit_softcapping); use a model without it or set it to None")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{NAME} has no attention sinks (s_aux)")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    if dropout and module.training:
        raise NotImplementedError(f"{NAME} has no attention dropout; set attention_dropout=0 to train")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{NAME} expects a [batch, seq] padding mask, got shape {tuple(attention_mask.shape)}; "
                         "register() installs the matching mask function")
    key, value = share_kv_heads(query, key, value, head_axis=1)
    seq_len = query.shape[2]
    window = None if sliding_window is None else sliding_window - 1
    key_padding_mask = None if attention_mask is None else attention_mask.bool()
    if key.shape[2] != seq_len or (key_padding_mask is not None and key_padding_mask.shape[1] != seq_len):
        if not causal:
            raise ValueError(f"{NAME}: {seq_len} queries but {key.shape[2]} keys in a bidirectional layer")
        out = _attention_after_cache(query, key, value, key_padding_mask, window, scaling)
    else:
        layout = layout_for(-(-seq_len // BLOCK_SIZE), window, causal)
        out = block_sparse_attention(query, key, value, layout, window=window, causal=causal, scale=scaling,
                                     key_padding_mask=key_padding_mask)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention function and its padding-mask function under ``name``."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    # The [batch, seq] padding mask (or None), as for flash attention: the kernels take it as is.
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
