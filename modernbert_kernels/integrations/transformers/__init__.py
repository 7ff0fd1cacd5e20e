"""transformers on these kernels.

- ``register()``: the attention backend ``attn_implementation="modernbert_kernels"`` for every
  model that calls transformers' attention interface (attention.py);
- ``replace_attention(model)``: the models that bring their own attention code (Longformer, LED,
  BigBird), their attention modules swapped in place, one adapter file per family;
- ``quantize_int8(model)``: an encoder's linear layers as W8A8 Int8Linear (int8.py).
"""

from .attention import NAME, attention_forward, register
from .int8 import quantize_int8
from .replace import replace_attention

__all__ = ["NAME", "attention_forward", "quantize_int8", "register", "replace_attention"]
