"""modernbert-kernels: block-sparse attention and fused int8 matmul kernels for BERT-style encoders."""

from . import layouts
from .attention import block_sparse_attention
from .int8 import Int8Linear, int8_linear, interleave_geglu, quantize_per_channel, quantize_per_token
from .layout import BlockSparseLayout

__all__ = [
    "BlockSparseLayout",
    "Int8Linear",
    "block_sparse_attention",
    "int8_linear",
    "interleave_geglu",
    "layouts",
    "quantize_per_channel",
    "quantize_per_token",
]
__version__ = "0.1.0"
