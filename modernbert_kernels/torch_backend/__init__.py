"""backend="torch": block-sparse attention in plain PyTorch, on any device.

- ``plan``: a layout's visited tiles grouped into batched matmuls (diagonal runs and a gathered
  rest), computed once per layout and sequence length.
- ``tiles``: the tile loops that run a plan (online softmax forward, recomputing backward).
- ``fused_sdpa``: the strategy for dense layouts on the CPU, PyTorch's fused attention kernel.
- ``attention``: the entry points: strategy choice, padded and variable-length batches.
"""

from .attention import attention_backward, attention_forward

__all__ = ["attention_backward", "attention_forward"]
