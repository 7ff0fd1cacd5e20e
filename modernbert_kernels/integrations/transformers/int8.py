"""``quantize_int8(model)``: the linear layers of a transformers encoder (BERT, RoBERTa, XLM-R,
ModernBERT, ...) as this package's W8A8 Int8Linear, in place."""

from __future__ import annotations

from torch import nn

from ...int8 import Int8Linear, input_channel_maxima


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
