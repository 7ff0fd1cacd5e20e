"""modernbert-kernels: block-sparse attention and fused int8 matmul kernels for BERT-style encoders."""

from . import layouts
from .attention import block_sparse_attention
from .layout import BlockSparseLayout

__all__ = ["BlockSparseLayout", "block_sparse_attention", "layouts"]
__version__ = "0.1.0"
