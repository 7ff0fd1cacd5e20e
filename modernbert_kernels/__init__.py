"""modernbert-kernels: block-sparse attention and fused int8 matmul kernels for BERT-style encoders."""

from importlib import metadata as _metadata

from . import layouts
from .attention import bind_attention, block_sparse_attention
from .int8 import (Int8Linear, int8_linear, int8_linear_dynamic, int8_pack_weight, interleave_geglu,
                   quantize_per_channel, quantize_per_token)
from .block_sparse_layout import BlockSparseLayout
from .rotary import bind_rotary, rotary_embedding

# transformers' attention-function contract, and FlashAttention-2's calling convention: what
# transformers calls on a kernel-hub build (attn_implementation="<org>/<repo>:attention_forward").
# Imported on first use: the integration imports torch._dynamo (~1 s), which the kernels alone,
# and every process that only runs them, do not need.
_INTEGRATION_ATTRIBUTES = {
    "attention_forward": ".integrations.transformers.attention",
    "flash_attn_func": ".integrations.flash_attn",
    "flash_attn_varlen_func": ".integrations.flash_attn",
}


def __getattr__(name: str):
    if name not in _INTEGRATION_ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_INTEGRATION_ATTRIBUTES[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_INTEGRATION_ATTRIBUTES))


__all__ = [
    "BlockSparseLayout",
    "Int8Linear",
    "attention_forward",
    "bind_attention",
    "bind_rotary",
    "block_sparse_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "int8_linear",
    "int8_linear_dynamic",
    "int8_pack_weight",
    "interleave_geglu",
    "layouts",
    "quantize_per_channel",
    "quantize_per_token",
    "rotary_embedding",
]
try:  # the installed distribution's version, with its build tag (e.g. 0.1.0+cu13torch2.11)
    __version__ = _metadata.version("modernbert-kernels")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.1.0"
