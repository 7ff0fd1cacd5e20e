"""The torch backend's entry points: per sequence, a strategy (fused SDPA for dense layouts on the
CPU, else the tile loops over the layout's cached plan); padded and variable-length batches."""

from __future__ import annotations

import torch

from . import fused_sdpa, tiles
from .plan import layout_plan


def _plan(row_offsets, col_indices, block_size, seq_len):
    return layout_plan(row_offsets, col_indices, -(-seq_len // block_size))


def _forward_padded(q, k, v, row_offsets, col_indices, block_size, window, scale, softcap, key_padding_mask):
    plan = _plan(row_offsets, col_indices, block_size, q.shape[2])
    if fused_sdpa.applies(q.device, plan.dense, window, softcap, key_padding_mask):
        out, lse = fused_sdpa.forward(q, k, v, scale)
        return out.contiguous(), lse.contiguous()
    return tiles.forward(q, k, v, plan, block_size, window, scale, softcap, key_padding_mask)


def _backward_padded(dout, q, k, v, out, lse, row_offsets, col_indices, block_size, window, scale, softcap,
                     key_padding_mask):
    plan = _plan(row_offsets, col_indices, block_size, q.shape[2])
    if fused_sdpa.applies(q.device, plan.dense, window, softcap, key_padding_mask):
        return fused_sdpa.backward(dout, q, k, v, out, lse, scale)
    return tiles.backward(dout, q, k, v, out, lse, plan, block_size, window, scale, softcap, key_padding_mask)


def _per_sequence(bounds, *tensors):
    """Varlen [total, heads, dim] tensors -> per-sequence [1, heads, len, dim] views (non-empty)."""
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            yield start, end, [t[start:end].transpose(0, 1)[None] for t in tensors]


def _common_length(bounds) -> int | None:
    """The length every sequence of a varlen batch has, if they all have one and it is not 0."""
    lengths = {end - start for start, end in zip(bounds[:-1], bounds[1:])}
    return lengths.pop() if len(lengths) == 1 and 0 not in lengths else None


def _as_batch(length, *tensors):
    """Varlen [total, heads, dim] tensors of sequences all ``length`` long -> [batch, heads, length,
    dim] views."""
    return [t.unflatten(0, (-1, length)).transpose(1, 2) for t in tensors]


def attention_forward(q, k, v, row_offsets, col_indices, block_size, window, scale, softcap, key_padding_mask,
                      cu_seqlens):
    """(out, lse) for [batch, heads, seq, dim] inputs, or [total, heads, dim] with cu_seqlens
    (lse [heads, total]); ``window`` is (left, right): query i sees key j only where
    -right <= i - j <= left, -1 leaving a side unbounded; ``softcap`` 0 for no cap."""
    if cu_seqlens is None:
        return _forward_padded(q, k, v, row_offsets, col_indices, block_size, window, scale, softcap,
                               key_padding_mask)
    bounds = cu_seqlens.tolist()
    if (length := _common_length(bounds)) is not None:
        # Sequences of one length (one sequence, or full fixed-length batches): a padded batch
        # without padding, one call (eight calls of one 512-token sequence each took ~1 ms more in
        # bf16 than one of eight). Its output, transposed once, is the whole result.
        o, l = _forward_padded(*_as_batch(length, q, k, v), row_offsets, col_indices, block_size, window, scale,
                               softcap, None)
        return o.transpose(1, 2).flatten(0, 1).contiguous(), l.transpose(0, 1).flatten(1).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
    for start, end, seq in _per_sequence(bounds, q, k, v):
        o, l = _forward_padded(*seq, row_offsets, col_indices, block_size, window, scale, softcap, None)
        out[start:end] = o[0].transpose(0, 1)
        lse[:, start:end] = l[0]
    return out, lse


def attention_backward(dout, q, k, v, out, lse, row_offsets, col_indices, block_size, window, scale, softcap,
                       key_padding_mask, cu_seqlens):
    """(dq, dk, dv) like q, contiguous."""
    if cu_seqlens is None:
        return _backward_padded(dout, q, k, v, out, lse, row_offsets, col_indices, block_size, window, scale, softcap,
                                key_padding_mask)
    bounds = cu_seqlens.tolist()
    if (length := _common_length(bounds)) is not None:
        batch_lse = lse.unflatten(1, (-1, length)).transpose(0, 1)
        grads = _backward_padded(*_as_batch(length, dout, q, k, v, out), batch_lse, row_offsets, col_indices,
                                 block_size, window, scale, softcap, None)
        return tuple(g.transpose(1, 2).flatten(0, 1).contiguous() for g in grads)
    grads = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    for start, end, seq in _per_sequence(bounds, dout, q, k, v, out):
        seq_grads = _backward_padded(*seq, lse[None, :, start:end], row_offsets, col_indices, block_size, window,
                                     scale, softcap, None)
        for grad, seq_grad in zip(grads, seq_grads):
            grad[start:end] = seq_grad[0].transpose(0, 1)
    return tuple(grads)
