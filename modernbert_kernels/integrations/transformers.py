"""Run transformers models (ModernBERT, BERT, ...) on block_sparse_attention.

    from modernbert_kernels.integrations.transformers import register
    register()
    model = AutoModel.from_pretrained(path, attn_implementation="modernbert_kernels")

Full attention runs on a dense block layout, sliding-window layers on a sliding_window layout with
the exact token window; the padding mask becomes ``key_padding_mask``. transformers passes the
window in flash-attention's convention (``sliding_window - 1`` tokens on each side), which is what
its SDPA masks compute too.

``quantize_int8(model)`` turns the linear layers of a transformers encoder (BERT, RoBERTa, XLM-R,
ModernBERT, ...) into this package's W8A8 Int8Linear, in place.
"""

from __future__ import annotations

import functools


from torch import nn

from .. import layouts
from ..attention import block_sparse_attention
from ..int8 import Int8Linear, input_channel_maxima

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


def _quantizable_linears(model: nn.Module, include_head: bool) -> list[tuple[str, nn.Linear]]:
    """(name, module) of each nn.Linear to convert: those of the encoder (``model.base_model``)
    but its embeddings' and pooler's, plus, with ``include_head``, the pooler and the task head's
    (a decoder tied to the input embeddings stays float: converting it would copy them)."""
    base = getattr(model, "base_model", model)
    in_base = {id(m) for m in base.modules()}
    tied = {id(p) for p in base.get_input_embeddings().parameters()} if hasattr(base, "get_input_embeddings") else set()
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or "embeddings" in name.split("."):
            continue
        is_head = id(module) not in in_base or "pooler" in name.split(".")
        if (is_head and not include_head) or id(module.weight) in tied:
            continue
        chosen.append((name, module))
    return chosen


def quantize_int8(model: nn.Module, calibration=None, alpha: float = 0.5, include_head: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` layers of a transformers encoder by ``Int8Linear`` (int8 weights
    per output channel, activations quantized per token on the fly), in place; returns ``model``.

    The embeddings and the task head (pooler, classifier, LM head) stay float unless
    ``include_head``. ``calibration``: an iterable of model inputs (dicts of tensors, as a
    tokenizer returns them, or input_ids tensors); when given, each layer is smoothed
    (SmoothQuant, migration strength ``alpha``) with the per-channel maxima of its inputs on them.
    """
    linears = _quantizable_linears(model, include_head)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    maxima = {}
    if calibration is not None:
        def run_calibration():
            for batch in calibration:
                model(**batch) if isinstance(batch, dict) else model(batch)

        maxima = input_channel_maxima(dict(linears), run_calibration)
    for name, linear in linears:
        observed = maxima.get(name)
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, Int8Linear.from_float(
            linear, calibration=None if observed is None else observed[None], alpha=alpha))
    return model
