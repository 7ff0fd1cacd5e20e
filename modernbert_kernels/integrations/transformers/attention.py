"""The transformers attention backend: models that call transformers' attention interface (BERT,
ModernBERT, the ModernBERT decoder, Mistral, Gemma 3, ...) on block_sparse_attention.

    from modernbert_kernels.integrations.transformers import register
    register()
    model = AutoModel.from_pretrained(path, attn_implementation="modernbert_kernels")

Full attention runs on a dense block layout (causal layers on the lower-triangular one), sliding-
window layers on a sliding_window layout with the exact token window, bidirectional or causal as
the module says; the padding mask becomes ``key_padding_mask``. transformers passes the window in
flash-attention's convention (``sliding_window - 1`` tokens back, and ahead for encoders), which is
what its SDPA masks compute too. Queries shorter than the keys (decoding after a KV cache) have no
tiles to skip: they run in PyTorch's SDPA over the keys inside their window, as do an
encoder-decoder's cross-attention layers (queries of one sequence, keys of another).

Packed sequences (no padding mask; several sequences in a row, told apart by ``position_ids`` that
restart, or by the ``cu_seq_lens_q`` of ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``)
run as a varlen batch, so no token sees another sequence's: what transformers' SDPA masks compute
when they detect packing, and what its flash-attention path does.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from ... import layouts
from ..._ops import add_op_namespace_prefix
from ...attention import block_sparse_attention
from ...tensor_cache import TensorCache

NAME = "modernbert_kernels"
BLOCK_SIZE = 64


class _KeptLayouts:
    """The layouts made so far, one attribute each, the least recently used dropped past 64 (a dense
    layout holds (seq / 64)^2 entries). Attributes of an object rather than a dict: torch.compile
    reads an attribute when it is traced, where it would read a dict once per graph, before the
    layouts the graph's later layers make."""

    limit = 64

    def __init__(self):
        self.names: collections.OrderedDict = collections.OrderedDict()


_kept = _KeptLayouts()


def layout_for(num_blocks: int, window: int | None, causal: bool, device: torch.device):
    """The layout of ``num_blocks`` blocks of BLOCK_SIZE for a layer, with its tensors on ``device``
    (made once per shape; the Longformer adapter and the FlashAttention API share it). At least one
    block: a call with no tokens still needs a layout, and gets empty outputs."""
    return getattr(_kept, _made_layout(max(1, num_blocks), window, causal, device))


@torch.compiler.assume_constant_result
def _made_layout(num_blocks: int, window: int | None, causal: bool, device: torch.device) -> str:
    """Makes the layout and its copy on ``device`` unless they are kept, and returns the layout's
    attribute name in ``_kept``. Under torch.compile this runs while tracing, and the graph reads
    the layout from ``_kept``: tracing its construction (nonzero, bincount) would break the graph
    in every layer, and a copy made in the graph would recompile it on the next call."""
    name = f"blocks{num_blocks}_window{window}_{'causal' if causal else 'bidirectional'}"
    if name in _kept.names:
        _kept.names.move_to_end(name)
        getattr(_kept, name).tensors_on(device)
        return name
    if window is not None:
        layout = layouts.sliding_window(num_blocks * BLOCK_SIZE, window, BLOCK_SIZE, causal=causal)
    elif causal:
        layout = layouts.causal(num_blocks * BLOCK_SIZE, BLOCK_SIZE)
    else:
        layout = layouts.dense(num_blocks * BLOCK_SIZE, BLOCK_SIZE)
    layout.tensors_on(device)
    setattr(_kept, name, layout)
    _kept.names[name] = None
    if len(_kept.names) > _kept.limit:
        delattr(_kept, _kept.names.popitem(last=False)[0])
    return name


def share_kv_heads(q, k, v, head_axis: int):
    """Grouped-query attention: each key/value head repeated for the query heads that share it."""
    repeat = q.shape[head_axis] // k.shape[head_axis]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, head_axis), v.repeat_interleave(repeat, head_axis)
    return k, v


def dense_attention(query, key, value, visible, scale, softcap=None, sinks=None):
    """PyTorch's SDPA over the keys that ``visible`` (bool, broadcast to the scores) lets through.
    SDPA has no logit soft-capping and no sinks: with either, the same math is written out, which
    forms the scores (for the short query runs that come here: decoding steps, cross-attention)."""
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scale)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * (query.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # the head's sink logit as one more key with no value
        sink_column = sinks.float()[:, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink_column], -1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(value.dtype), value)


def attention_after_cache(query, key, value, key_padding_mask, window, scale, softcap=None, sinks=None):
    """Causal attention of queries shorter than the keys: the queries are the last of the keys'
    positions (a StaticCache's padding mask, shorter than its keys, ends at the last real one), and
    only the keys inside the window are read."""
    q_len, kv_len = query.shape[2], key.shape[2]
    extent = kv_len if key_padding_mask is None else key_padding_mask.shape[1]
    if key_padding_mask is not None and extent < kv_len:
        key_padding_mask = F.pad(key_padding_mask, (0, kv_len - extent), value=False)
    first_query = extent - q_len
    start = 0 if window is None else max(0, first_query - window)
    distance = (first_query + torch.arange(q_len, device=query.device))[:, None] - torch.arange(
        start, kv_len, device=query.device)[None, :]
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance <= window)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, start:]
    return dense_attention(query, key[:, :, start:], value[:, :, start:], visible, scale, softcap, sinks)


@torch.library.custom_op(add_op_namespace_prefix("sequences_from_positions"), mutates_args=())
def sequences_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32) of the sequences packed in the rows of ``position_ids`` [batch, seq], the
    rows one after another. A sequence starts at each row's first token and wherever the position
    does not grow by one (transformers' rule for packed sequences). A custom op: under
    torch.compile, Dynamo keeps its data-dependent size in the graph where
    ``capture_dynamic_output_shape_ops`` is on, and breaks the graph there where it is not."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids.diff(dim=1) != 1
    first_tokens = starts.flatten().nonzero().flatten()
    return torch.cat([first_tokens, first_tokens.new_tensor([position_ids.numel()])]).to(torch.int32)


@sequences_from_positions.register_fake
def _(position_ids):
    bounds = torch.library.get_ctx().new_dynamic_size(min=2)  # sequences + 1, at least one sequence
    return position_ids.new_empty(bounds, dtype=torch.int32)


# (cu_seqlens, longest) per position_ids tensor: every layer gets the same one, so it is read once a forward.
_packings = TensorCache()


def _eager_packing(position_ids: torch.Tensor, batch: int):
    cu_seqlens = sequences_from_positions(position_ids.expand(batch, -1))
    if cu_seqlens.numel() == batch + 1:
        return None  # one sequence a row: not packed
    return cu_seqlens, int(cu_seqlens.diff().max())


def _packed_sequences(kwargs: dict, batch: int, seq_len: int):
    """(cu_seqlens, max_seqlen) of the sequences packed in the batch's rows, or None when each row
    holds one. Under torch.compile the values cannot be read, so any batch with position_ids runs
    as varlen, one sequence a row at the least, with max_seqlen = seq_len."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        keys = kwargs.get("cu_seq_lens_k")
        if keys is not None and not same_sequences(keys, cu_seqlens):
            raise NotImplementedError(f"{NAME}: packed queries and keys must come from the same sequences "
                                      "(cu_seq_lens_q == cu_seq_lens_k)")
        longest = kwargs.get("max_length_q")
        return cu_seqlens.to(torch.int32), seq_len if longest is None else int(longest)
    position_ids = kwargs.get("position_ids")
    if (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
            or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch)):
        return None  # no positions, or not one per token (e.g. multimodal 3-D positions): not packed
    if torch.compiler.is_compiling():
        return sequences_from_positions(position_ids.expand(batch, -1)), seq_len
    return _packings.get(position_ids, batch, lambda: _eager_packing(position_ids, batch))


def same_sequences(cu_seqlens_a: torch.Tensor, cu_seqlens_b: torch.Tensor) -> bool:
    """Whether two cu_seqlens bound the same sequences."""
    return cu_seqlens_a is cu_seqlens_b or (cu_seqlens_a.shape == cu_seqlens_b.shape
                                            and torch.equal(cu_seqlens_a, cu_seqlens_b))


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, window, causal: bool, scale, softcap=None, sinks=None):
    """[total_tokens, heads, dim] sequences on the kernels, the layout sized for the longest."""
    layout = layout_for(-(-max_seqlen // BLOCK_SIZE), window, causal, q.device)
    return block_sparse_attention(q, k, v, layout, window=window, causal=causal, scale=scale, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen, softcap=softcap, sinks=sinks)


def cross_attention(query, key, value, key_padding_mask, scale, softcap=None, sinks=None):
    """Bidirectional attention of queries to other keys (an encoder-decoder's cross-attention): no
    tiles to skip, so PyTorch's SDPA over every real key. A query whose example has no real key gets
    0, as from the kernels (SDPA would give NaN)."""
    if key_padding_mask is None:
        return dense_attention(query, key, value, None, scale, softcap, sinks)
    if key_padding_mask.shape[1] != key.shape[2]:
        raise ValueError(f"{NAME}: a padding mask of {key_padding_mask.shape[1]} keys for {key.shape[2]} keys")
    no_key = ~key_padding_mask.any(dim=1)
    visible = (key_padding_mask | no_key[:, None])[:, None, None, :]
    out = dense_attention(query, key, value, visible, scale, softcap, sinks)
    return out.masked_fill(no_key[:, None, None, None], 0)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, s_aux=None, **kwargs):
    """transformers' attention-function contract: [batch, heads, seq, dim] in, ([batch, seq, heads, dim], None) out.
    ``softcap``: Gemma 2's attn_logit_softcapping; ``s_aux``: GPT-OSS's attention sinks, [heads]."""
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    if dropout and module.training:
        raise NotImplementedError(f"{NAME} has no attention dropout; set attention_dropout=0 to train")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{NAME} expects a [batch, seq] padding mask, got shape {tuple(attention_mask.shape)}; "
                         "register() installs the matching mask function")
    key, value = share_kv_heads(query, key, value, head_axis=1)
    seq_len = query.shape[2]
    window = None if sliding_window is None else sliding_window - 1
    key_padding_mask = None if attention_mask is None else attention_mask.bool()
    if key.shape[2] != seq_len or (key_padding_mask is not None and key_padding_mask.shape[1] != seq_len):
        if causal:
            out = attention_after_cache(query, key, value, key_padding_mask, window, scaling, softcap, s_aux)
        elif window is None:
            out = cross_attention(query, key, value, key_padding_mask, scaling, softcap, s_aux)
        else:
            raise ValueError(f"{NAME}: {seq_len} queries but {key.shape[2]} keys in a bidirectional sliding-window "
                             "layer: which keys a query's window holds is not defined")
        return out.transpose(1, 2).contiguous(), None
    packed = None
    if key_padding_mask is None and query.shape[0] > 0 and seq_len > 0:
        packed = _packed_sequences(kwargs, query.shape[0], seq_len)
    if packed is not None:
        return _packed_attention(query, key, value, *packed, window, causal, scaling, softcap, s_aux), None
    layout = layout_for(-(-seq_len // BLOCK_SIZE), window, causal, query.device)
    out = block_sparse_attention(query, key, value, layout, window=window, causal=causal, scale=scaling,
                                 key_padding_mask=key_padding_mask, softcap=softcap, sinks=s_aux)
    return out.transpose(1, 2).contiguous(), None


def _packed_attention(query, key, value, cu_seqlens, max_seqlen, window, causal, scale, softcap, sinks):
    """The rows of [batch, heads, seq, dim] as one varlen batch -> [batch, seq, heads, dim]."""
    batch, heads, seq_len, head_dim = query.shape
    tokens = [t.transpose(1, 2).reshape(batch * seq_len, heads, head_dim) for t in (query, key, value)]
    out = varlen_attention(*tokens, cu_seqlens, max_seqlen, window, causal, scale, softcap, sinks)
    return out.view(batch, seq_len, heads, head_dim)


def padding_mask(*args, **kwargs):
    """transformers' mask-function contract: the [batch, kv_length] padding mask, or None where every
    key is real, as for flash attention (the kernels take it as is). Under torch.compile the mask is
    kept even where every key is real: a branch on its values would break the graph at every mask,
    and the kernels give the same output with it."""
    from transformers.masking_utils import flash_attention_mask

    attention_mask = kwargs.get("attention_mask")
    if torch.compiler.is_compiling() and attention_mask is not None:
        return attention_mask[:, -kwargs["kv_length"]:]
    return flash_attention_mask(*args, **kwargs)


def register(name: str = NAME) -> str:
    """Register the attention function and its padding-mask function under ``name``."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name
