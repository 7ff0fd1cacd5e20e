"""quantize_int8(model): every linear layer of the encoder (and the head's dense) to W8A8 Int8Linear."""

from __future__ import annotations

import torch
from torch import nn

from modernbert_kernels import Int8Linear
from modernbert_kernels.int8 import input_channel_maxima

from .model import ModernBertModel

# config.json's "quantization_config": {"quant_method": QUANT_METHOD, ...} marks an int8 checkpoint
# (transformers refuses an unknown method instead of loading int8 tensors as floats).
QUANT_METHOD = "modernbert_kernels_w8a8"


def _targets(model: nn.Module):
    """(parent, attribute, fused activation) of each linear layer to convert."""
    encoder = model if isinstance(model, ModernBertModel) else model.model
    for layer in encoder.layers:
        yield layer.attn, "Wqkv", None
        yield layer.attn, "Wo", None
        # GeGLU is fused into Wi's epilogue when the MLP's activation is the exact GELU.
        yield layer.mlp, "Wi", "geglu" if encoder.config.hidden_activation == "gelu" else None
        yield layer.mlp, "Wo", None
    head = getattr(model, "head", None)
    if head is not None:
        yield head, "dense", "gelu" if encoder.config.classifier_activation == "gelu" else None


def quantize_int8(model: nn.Module, calibration=None, alpha: float = 0.5,
                  attention_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace Wqkv, attention Wo, MLP Wi (with GeGLU fused) and Wo, and the head's dense layer by
    Int8Linear, in place; returns the model.

    ``calibration``: an iterable of ``input_ids`` or ``(input_ids, attention_mask)`` batches; when
    given, each layer is smoothed (SmoothQuant, strength ``alpha``) with the per-channel maxima of
    its inputs on them. ``attention_dtype=torch.bfloat16`` also runs the attention itself on bf16
    q, k, v (fp32 accumulation and softmax), as int8 deployments usually do: the linear layers are
    int8 and the attention is then the largest fp32 cost left (see benchmarks/NOTES.md).
    """
    _set_attention_dtype(model, attention_dtype)
    targets = list(_targets(model))
    maxima = {}
    if calibration is not None:
        def run_calibration():
            for batch in calibration:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)

        maxima = input_channel_maxima({(id(parent), name): getattr(parent, name) for parent, name, _ in targets},
                                      run_calibration)
    for parent, name, fused in targets:
        linear = getattr(parent, name)
        observed = maxima.get((id(parent), name))
        setattr(parent, name, Int8Linear.from_float(
            linear, activation=fused, calibration=None if observed is None else observed[None], alpha=alpha,
        ))
        if fused == "gelu":  # the head applies its activation itself otherwise
            parent.act = nn.Identity()
    model.config.extra["quantization_config"] = {
        "quant_method": QUANT_METHOD, "weights": "int8 per output channel", "activations": "int8 per token",
        "smoothquant_alpha": alpha if calibration is not None else None,
        "attention_dtype": None if attention_dtype is None else str(attention_dtype).removeprefix("torch."),
    }
    return model


def _set_attention_dtype(model: nn.Module, attention_dtype: torch.dtype | None) -> None:
    encoder = model if isinstance(model, ModernBertModel) else model.model
    for layer in encoder.layers:
        layer.attn.attention_dtype = attention_dtype


def int8_layers_like(model: nn.Module, state: dict) -> None:
    """Give ``model`` the structure quantize_int8 gave the model that wrote ``state``: empty
    Int8Linear layers (on the model's device, meta while loading) where its linears were, smoothed
    where ``state`` holds a smoothing vector. from_pretrained then loads the int8 tensors into them,
    without ever holding float weights."""
    settings = model.config.extra["quantization_config"]
    dtype = settings.get("attention_dtype")
    _set_attention_dtype(model, None if dtype is None else getattr(torch, dtype))
    names = {id(module): name for name, module in model.named_modules()}
    for parent, name, fused in _targets(model):
        linear = getattr(parent, name)
        prefix = f"{names[id(parent)]}.{name}".lstrip(".")
        with torch.device(linear.weight.device):
            setattr(parent, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, fused,
                                             smoothed=f"{prefix}.smooth" in state))
        if fused == "gelu":
            parent.act = nn.Identity()
