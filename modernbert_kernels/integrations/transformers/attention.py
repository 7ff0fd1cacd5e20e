"""The transformers attention backend: models that call transformers' attention interface (BERT,
ModernBERT, the ModernBERT decoder, Mistral, Gemma 3, ...) on block_sparse_attention.

    from modernbert_kernels.integrations.transformers import register
    register()
    model = AutoModel.from_pretrained(path, attn_implementation="modernbert_kernels")

Full attention runs on a dense block layout (causal layers on the lower-triangular one), sliding-
window layers on a sliding_window layout with the exact token window, bidirectional or causal as
the module says; the padding mask becomes ``key_padding_mask``. transformers passes the window in
flash-attention's convention (``sliding_window - 1`` tokens back, and ahead for encoders), which is
what its SDPA masks compute too. A model that gives its attention no window (PhiMoE) and slides only
in its masks gets the window its masks apply, read from its config. Queries shorter than the keys
(decoding after a KV cache) have no tiles to skip: they run in PyTorch's SDPA over the keys inside
their window, as do an encoder-decoder's cross-attention layers (queries of one sequence, keys of
another).

Packed sequences (no padding mask; several sequences in a row, told apart by ``position_ids`` that
restart, or by the ``cu_seq_lens_q`` of ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``)
run as a varlen batch, so no token sees another sequence's: what transformers' SDPA masks compute
when they detect packing, and what its flash-attention path does.

Chunked layers (Llama 4's ``attention_chunk_size``: causal inside chunks of that many tokens, counted
from each sequence's first real token) run as a varlen batch too, one sequence per chunk. A mask that
the kernels do not compute (an overlay that lets image tokens see each other both ways, a prefix
seen bidirectionally, a user's own mask function) is not dropped: the mask function returns
transformers' own boolean mask, and those layers run in PyTorch's SDPA over it, with a warning.
"""

from __future__ import annotations

import collections
import warnings

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


def _packed_sequences(kwargs: dict, batch: int, seq_len: int, sequence_ids=None):
    """(cu_seqlens, max_seqlen) of the sequences packed in the batch's rows, or None when each row
    holds one. From the flash-attention kwargs, else from ``position_ids``, else from ``sequence_ids``
    (transformers' packed-sequence index of each token, which padding_mask returns for models that
    pass no positions to their attention). Under torch.compile the values cannot be read, so any
    batch with position_ids or sequence_ids runs as varlen, one sequence a row at the least, with
    max_seqlen = seq_len."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        keys = kwargs.get("cu_seq_lens_k")
        if keys is not None and not same_sequences(keys, cu_seqlens):
            raise NotImplementedError(f"{NAME}: packed queries and keys must come from the same sequences "
                                      "(cu_seq_lens_q == cu_seq_lens_k)")
        longest = kwargs.get("max_length_q")
        return cu_seqlens.to(torch.int32), seq_len if longest is None else int(longest)
    positions = kwargs.get("position_ids")
    if (not isinstance(positions, torch.Tensor) or positions.dim() != 2
            or positions.shape[1] != seq_len or positions.shape[0] not in (1, batch)):
        positions = None  # no positions, or not one per token (e.g. multimodal 3-D positions)
    source = positions
    if positions is None and sequence_ids is not None:
        # positions that grow by one inside a sequence and jump where the index changes
        positions = torch.arange(seq_len, device=sequence_ids.device) + sequence_ids.long() * (seq_len + 1)
        source = sequence_ids
    if positions is None:
        return None
    if torch.compiler.is_compiling():
        return sequences_from_positions(positions.expand(batch, -1)), seq_len
    return _packings.get(source, batch, lambda: _eager_packing(positions, batch))


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
    return masked_attention(query, key, value, key_padding_mask[:, None, None, :], scale, softcap, sinks)


def masked_attention(query, key, value, visible, scale, softcap=None, sinks=None):
    """SDPA over a boolean [batch, 1 or heads, queries, keys] mask; a query that sees no key gets 0,
    as from the kernels (SDPA would give NaN)."""
    sees_none = ~visible.any(dim=-1, keepdim=True)
    out = dense_attention(query, key, value, visible | sees_none, scale, softcap, sinks)
    return out.masked_fill(sees_none, 0)


def _layer_type(module, setting: str) -> str | None:
    """config.layer_types' entry for this attention module, None where the config names no
    layer_types. ``setting`` is the config field being placed, for the error."""
    layer_types = getattr(module.config, "layer_types", None)
    if layer_types is None:
        return None
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise NotImplementedError(f"{NAME}: the config sets {setting} and names layer_types, but the attention module "
                                  "has no layer_idx, so which layers it applies to is not known")
    return layer_types[layer]


def sliding_window_of(module) -> int | None:
    """The window of a layer whose model gives its attention no ``sliding_window`` (PhiMoE), as the
    model's masks apply it: config.sliding_window in the layers config.layer_types names
    "sliding_attention", or in every layer where the config has no layer_types."""
    window = getattr(getattr(module, "config", None), "sliding_window", None)
    if not window:
        return None
    layer_type = _layer_type(module, "sliding_window")
    return window if layer_type in (None, "sliding_attention") else None


def chunk_size(module) -> int | None:
    """The chunk of a chunked-attention layer (config.attention_chunk_size, Llama 4), None for others."""
    chunk = getattr(getattr(module, "config", None), "attention_chunk_size", None)
    if chunk is None:
        return None
    layer_type = _layer_type(module, "attention_chunk_size")
    if layer_type is None:
        raise NotImplementedError(f"{NAME}: the config sets attention_chunk_size but names no layer_types, so which "
                                  "layers are chunked is not known")
    return chunk if layer_type == "chunked_attention" else None


# Per padding mask or position_ids tensor: every chunked layer of a forward gets the same one.
_chunkings = TensorCache()


def _left_padding(key_padding_mask) -> torch.Tensor:
    """[batch, 1]: the padding tokens before each row's first real one."""
    return (key_padding_mask.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)


def _positions_in_chunks(key_padding_mask, sequence_ids, kwargs, batch: int, seq_len: int, chunk: int, device):
    """Each token's place in its chunk, [batch, seq], as transformers' chunked masks count: from each
    row's first real token where there is a padding mask (left padding), by position where the row
    holds packed sequences, else by index. A chunk ends wherever this does not grow by one."""
    index = torch.arange(seq_len, device=device)
    if key_padding_mask is not None:
        return (index - _left_padding(key_padding_mask)) % chunk
    packed = _packed_sequences(kwargs, batch, seq_len, sequence_ids)
    if packed is None:
        return (index % chunk).expand(batch, -1)
    position_ids = kwargs.get("position_ids")
    if kwargs.get("cu_seq_lens_q") is None and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        return position_ids.expand(batch, -1) % chunk
    # Told apart by cu_seqlens alone: positions count from each sequence's start.
    cu_seqlens = packed[0].long()
    starts = torch.zeros(batch * seq_len, dtype=torch.long, device=cu_seqlens.device)
    starts[cu_seqlens[:-1]] = cu_seqlens[:-1]
    tokens = torch.arange(batch * seq_len, device=cu_seqlens.device)
    return ((tokens - starts.cummax(0).values) % chunk).view(batch, seq_len)


def _real_tokens_in_one_run(key_padding_mask) -> torch.Tensor:
    """Whether each row's real tokens are one run (left and right padding, no holes)."""
    index = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    first = _left_padding(key_padding_mask)
    run = (index >= first) & (index < first + key_padding_mask.sum(dim=1, keepdim=True))
    return (run == key_padding_mask).all()


def chunked_attention(query, key, value, key_padding_mask, sequence_ids, kwargs, chunk, scale, softcap, sinks):
    """A chunked layer on the kernels: each chunk of each row one sequence of a varlen batch. Padding
    after a row's last real token sits in its last chunk, where causality hides it; left padding
    forms chunks of its own. [batch, heads, seq, dim] -> [batch, seq, heads, dim]."""
    batch, _, seq_len, _ = query.shape
    if key_padding_mask is not None:
        if torch.compiler.is_compiling():
            torch._assert_async(_real_tokens_in_one_run(key_padding_mask),
                                f"{NAME}: a chunked layer's padding mask must pad only before and after the real tokens")
        elif not _chunkings.get(key_padding_mask, "one run", lambda: bool(_real_tokens_in_one_run(key_padding_mask))):
            # Padding between real tokens: no varlen batch skips it, so the mask is written out.
            index = torch.arange(seq_len, device=query.device)
            chunk_of = (index - _left_padding(key_padding_mask)) // chunk
            visible = ((index[:, None] >= index[None, :]) & (chunk_of[:, :, None] == chunk_of[:, None, :])
                       & key_padding_mask[:, None, :])
            return masked_attention(query, key, value, visible[:, None], scale, softcap, sinks).transpose(1, 2)

    def bounds():
        return sequences_from_positions(
            _positions_in_chunks(key_padding_mask, sequence_ids, kwargs, batch, seq_len, chunk, query.device))

    source = next((t for t in (key_padding_mask, sequence_ids, kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"))
                   if isinstance(t, torch.Tensor)), None)
    if torch.compiler.is_compiling() or source is None:
        cu_seqlens = bounds()
    else:
        cu_seqlens = _chunkings.get(source, ("bounds", batch, seq_len, chunk), bounds)
    return _packed_attention(query, key, value, cu_seqlens, min(chunk, seq_len), None, True, scale, softcap, sinks)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, s_aux=None, **kwargs):
    """transformers' attention-function contract: [batch, heads, seq, dim] in, ([batch, seq, heads, dim], None) out.
    ``softcap``: Gemma 2's attn_logit_softcapping; ``s_aux``: GPT-OSS's attention sinks, [heads].

    ``attention_mask`` is what padding_mask made: None, a boolean [batch, keys] padding mask, an
    int32 [batch, seq] index of each token's packed sequence, or transformers' own boolean
    [batch, 1, queries, keys] mask for a pattern the kernels do not compute."""
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    if dropout and module.training:
        raise NotImplementedError(f"{NAME} has no attention dropout; set attention_dropout=0 to train")
    key, value = share_kv_heads(query, key, value, head_axis=1)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        out = masked_attention(query, key, value, attention_mask, scaling, softcap, s_aux)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{NAME} expects a [batch, seq] padding mask or a boolean [batch, 1 or heads, queries, keys] "
                         f"mask, got shape {tuple(attention_mask.shape)} ({attention_mask.dtype}); register() "
                         "installs the matching mask function")
    sequence_ids = attention_mask if attention_mask is not None and attention_mask.dtype == torch.int32 else None
    key_padding_mask = None if attention_mask is None or sequence_ids is not None else attention_mask.bool()
    seq_len = query.shape[2]
    if sliding_window is None:
        sliding_window = sliding_window_of(module)
    window = None if sliding_window is None else sliding_window - 1
    chunk = chunk_size(module)
    if key.shape[2] != seq_len or (key_padding_mask is not None and key_padding_mask.shape[1] != seq_len):
        if chunk is not None:
            raise ValueError(f"{NAME}: a chunked layer's {seq_len} queries after a KV cache need transformers' chunked "
                             "mask; register() installs the mask function that makes it")
        if causal:
            out = attention_after_cache(query, key, value, key_padding_mask, window, scaling, softcap, s_aux)
        elif window is None:
            out = cross_attention(query, key, value, key_padding_mask, scaling, softcap, s_aux)
        else:
            raise ValueError(f"{NAME}: {seq_len} queries but {key.shape[2]} keys in a bidirectional sliding-window "
                             "layer: which keys a query's window holds is not defined")
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] > 0 and seq_len > 0:
        if chunk is not None:
            return chunked_attention(query, key, value, key_padding_mask, sequence_ids, kwargs, chunk, scaling,
                                     softcap, s_aux), None
        packed = None if key_padding_mask is not None else _packed_sequences(kwargs, query.shape[0], seq_len,
                                                                              sequence_ids)
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


# (code of a transformers mask function, what it is), and (code of a combinator, the closure cell
# holding what it combines): the pieces of the masks the kernels compute. Set by register().
_mask_leaves: tuple = ()
_mask_combinators: tuple = ()
_packed_index_cell = 0


def _learn_mask_pieces():
    """Reads the codes of transformers' mask functions. One this transformers lacks, or builds
    differently, is left out: a mask made with it runs on transformers' own mask (safe, slower)."""
    from transformers import masking_utils as mu

    global _mask_leaves, _mask_combinators, _packed_index_cell
    table = torch.zeros(1, 1, dtype=torch.long)

    def made(factory: str, *args):
        try:
            return getattr(mu, factory)(*args)
        except (AttributeError, TypeError):
            return None

    leaves = [(mu.causal_mask_function, "causal"), (getattr(mu, "bidirectional_mask_function", None), "bidirectional"),
              (made("sliding_window_overlay", 1), "window"), (made("sliding_window_bidirectional_overlay", 1), "window"),
              (made("chunked_overlay", 1, table), "chunked"), (made("padding_mask_function", table), "padding")]
    packed = made("packed_sequence_mask_function", table)
    if packed is not None and "packed_sequence_mask" in packed.__code__.co_freevars:
        _packed_index_cell = packed.__code__.co_freevars.index("packed_sequence_mask")
        leaves.append((packed, "packed"))
    _mask_leaves = tuple((function.__code__, piece) for function, piece in leaves if function is not None)
    combinators = []
    for function, cell in ((made("and_masks", mu.causal_mask_function), "mask_functions"),
                           (made("remap_positions_for_packed_sequence", mu.causal_mask_function, table), "mask_function")):
        if function is not None and cell in function.__code__.co_freevars:
            combinators.append((function.__code__, function.__code__.co_freevars.index(cell)))
    _mask_combinators = tuple(combinators)


def _known_leaf(mask_function) -> dict | None:
    """{piece: mask_function} if it is one of transformers' known mask pieces, else None."""
    code = mask_function.__code__
    for known, piece in _mask_leaves:
        if code is known:
            return {piece: mask_function}
    return None


def mask_pieces(mask_function) -> dict | None:
    """What a transformers mask function is made of: {"causal" | "window" | "chunked" | "padding" |
    "packed" | ...: the piece's function}, read from its closures; None if any piece is one the
    kernels do not compute (a union with another mask, a user's function). Plain attribute reads:
    Dynamo traces it."""
    leaf = _known_leaf(mask_function)
    if leaf is not None:
        return leaf
    code = mask_function.__code__
    for known, cell in _mask_combinators:
        if code is known:
            parts = mask_function.__closure__[cell].cell_contents
            pieces = {}
            for part in parts if isinstance(parts, tuple) else (parts,):
                found = mask_pieces(part)
                if found is None:
                    return None
                pieces.update(found)
            return pieces
    return None


def _pieces_while_compiling(mask_function, kwargs) -> dict | None:
    """mask_pieces for a mask function made inside a traced region, where Dynamo reads a function's
    code but not (before torch 2.14) what its closures hold: a known piece alone; a combination
    made by transformers itself (a window, a chunk, packing: ``use_vmap`` is off where no other
    mask function was added), taken as one the kernels compute, except after a KV cache, where it
    could be a chunk's; anything else, None."""
    leaf = _known_leaf(mask_function)
    if leaf is not None:
        return leaf
    code = mask_function.__code__
    if (_mask_combinators and code is _mask_combinators[0][0] and not kwargs.get("use_vmap")
            and kwargs.get("q_length") == kwargs.get("kv_length")):
        return {"combined": mask_function}
    return None


def padding_mask(*args, **kwargs):
    """transformers' mask-function contract: the [batch, kv_length] padding mask, or None where every
    key is real, as for flash attention (the kernels take it as is). Under torch.compile the mask is
    kept even where every key is real: a branch on its values would break the graph at every mask,
    and the kernels give the same output with it.

    A mask the kernels do not compute, and a chunked layer's mask for queries after a KV cache, are
    transformers' own boolean [batch, 1, queries, keys] mask instead (attention_forward runs SDPA
    over it). Packed sequences that transformers found are their int32 [batch, seq] index (eager
    only: see _pieces_while_compiling)."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    mask_function = kwargs.get("mask_function")
    if mask_function is None:
        pieces = {}
    elif torch.compiler.is_compiling():
        pieces = _pieces_while_compiling(mask_function, kwargs)
    else:
        pieces = mask_pieces(mask_function)
    if pieces is None or ("chunked" in pieces and kwargs.get("q_length") != kwargs.get("kv_length")):
        if pieces is None and not torch.compiler.is_compiling():
            warnings.warn(f"{NAME}: this model's attention mask holds a pattern the kernels do not compute (a mask "
                          "function combined with another); its layers run in PyTorch's SDPA over the dense mask",
                          stacklevel=2)
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    if "packed" in pieces:
        # Packed sequences (transformers found them in position_ids): their index, since not every
        # model passes position_ids on to its attention (Llama 4 does not).
        return pieces["packed"].__closure__[_packed_index_cell].cell_contents.to(torch.int32)
    attention_mask = kwargs.get("attention_mask")
    if torch.compiler.is_compiling() and attention_mask is not None:
        return attention_mask[:, -kwargs["kv_length"]:]
    return flash_attention_mask(*args, **kwargs)


def register(name: str = NAME) -> str:
    """Register the attention function and its padding-mask function under ``name``."""
    from transformers import AttentionInterface, AttentionMaskInterface

    _learn_mask_pieces()
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name
