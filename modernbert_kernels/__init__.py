"""modernbert-kernels: block-sparse attention and fused int8 matmul kernels for BERT-style encoders."""

from importlib import metadata as _metadata

from . import layouts
from .attention import block_sparse_attention
from .int8 import Int8Linear, int8_linear, interleave_geglu, quantize_per_channel, quantize_per_token
from .block_sparse_layout import BlockSparseLayout
from .rotary import rotary_embedding
# transformers' attention-function contract, and FlashAttention-2's calling convention: what
# transformers calls on a kernel-hub build (attn_implementation="<org>/<repo>:attention_forward").
from .integrations.flash_attn import flash_attn_func, flash_attn_varlen_func
from .integrations.transformers.attention import attention_forward

__all__ = [
    "BlockSparseLayout",
    "Int8Linear",
    "attention_forward",
    "block_sparse_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "int8_linear",
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
