"""``replace_attention(model)``: swap the attention modules of models that bring their own
attention code for ones on these kernels, in place. One adapter file per model family."""

from __future__ import annotations

from torch import nn

from . import bigbird, longformer

# config.model_type -> the adapter's swap(model) -> number of modules swapped.
ADAPTERS = {
    "longformer": longformer.swap,
    "led": longformer.swap,  # the encoder's self-attention is Longformer's
    "big_bird": bigbird.swap,
}


def replace_attention(model: nn.Module) -> nn.Module:
    """Swap ``model``'s self-attention modules for ones that run on block_sparse_attention, in place,
    and return ``model``. Parameters keep their names, so checkpoints load before or after."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"replace_attention: no adapter for {type(model).__name__} (model_type={model_type!r}); supported: "
            f"{', '.join(sorted(ADAPTERS))}. Models that call transformers' attention interface (BERT, ModernBERT, "
            "Mistral, Gemma 3, ...) take attn_implementation='modernbert_kernels' after register() instead")
    if ADAPTERS[model_type](model) == 0:
        raise ValueError(f"replace_attention: found no attention module of {type(model).__name__} to replace")
    return model
