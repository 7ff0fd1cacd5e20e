"""Run transformers models (ModernBERT, BERT, ...) on block_sparse_attention.

    from modernbert_kernels.integrations.transformers import register
    register()
    model = AutoModel.from_pretrained(path, attn_implementation="modernbert_kernels")

Full attention runs on a dense block layout, sliding-window layers on a sliding_window layout with
the exact token window; the padding mask becomes ``key_padding_mask``. transformers passes the
window in flash-attention's convention (``sliding_window - 1`` tokens on each side), which is what
its SDPA masks compute too.
"""

from __future__ import annotations

import functools


from .. import layouts
from ..attention import block_sparse_attention

NAME = "modernbert_kernels"
BLOCK_SIZE = 64


@functools.lru_cache(maxsize=64)
def _layout(num_blocks: int, window: int | None):
    if window is None:
        return layouts.dense(num_blocks * BLOCK_SIZE, BLOCK_SIZE)
    return layouts.sliding_window(num_blocks * BLOCK_SIZE, window, BLOCK_SIZE)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      **kwargs):
    """transformers' attention-function contract: [batch, heads, seq, dim] in, ([batch, seq, heads, dim], None) out."""
    if kwargs.get("is_causal", getattr(module, "is_causal", False)):
        raise NotImplementedError(f"{NAME} implements bidirectional (encoder) attention only")
    if dropout and module.training:
        raise NotImplementedError(f"{NAME} has no attention dropout; set attention_dropout=0 to train")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{NAME} expects a [batch, seq] padding mask, got shape {tuple(attention_mask.shape)}; "
                         "register() installs the matching mask function")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: share key/value heads
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    seq_len = query.shape[2]
    window = None if sliding_window is None else sliding_window - 1
    layout = _layout(-(-seq_len // BLOCK_SIZE), window)
    key_padding_mask = None if attention_mask is None else attention_mask.bool()
    out = block_sparse_attention(query, key, value, layout, window=window, scale=scaling,
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
