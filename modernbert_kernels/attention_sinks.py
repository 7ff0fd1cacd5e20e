"""Attention sinks (GPT-OSS's): a learned logit per head in every row's softmax, with no value.

    out_i = sum_j e^(s_ij) v_j / (sum_j e^(s_ij) + e^(sink_h))

The kernels need no change for it. Their (out, lse) over the visible keys give the row's log-sum-exp
with the sink, lse' = logaddexp(lse, sink_h), and its output, out' = out * e^(lse - lse'). The
backward runs the kernels' own backward with (out', lse'): the probabilities it recomputes,
e^(s - lse'), are then the sink-aware ones, and its delta = rowsum(dO' * out') is the one they need.
The sink's gradient is the only new term: -sum_i e^(sink_h - lse'_i) delta_i over the head's rows.

A row that sees no key (lse = +inf in the kernels) puts all its weight on the sink: out' = 0, and
lse' = sink_h, which contributes nothing to the sink's gradient since its delta is 0.
"""

from __future__ import annotations

import torch


def _per_row(sinks: torch.Tensor, varlen: bool) -> torch.Tensor:
    """sinks [heads] broadcast to lse's layout: [batch, heads, seq], or [heads, tokens] (varlen)."""
    sinks = sinks.float()
    return sinks[:, None] if varlen else sinks[None, :, None]


def _rows_to_out(x: torch.Tensor, varlen: bool) -> torch.Tensor:
    """A per-row tensor in lse's layout -> broadcastable against out ([batch, heads, seq, d] or
    [tokens, heads, d])."""
    return x.transpose(0, 1)[..., None] if varlen else x[..., None]


def _with_sink(out, lse, sinks, varlen):
    """(out', lse') from the kernels' (out, lse)."""
    sink = _per_row(sinks, varlen)
    no_key = torch.isinf(lse) & (lse > 0)
    lse_sink = torch.where(no_key, sink.expand_as(lse), torch.logaddexp(lse, sink))
    weight = torch.where(no_key, 0.0, torch.exp(lse - lse_sink))
    # In out's dtype: one pass over the output (the weight's rounding to 16 bits is below out's own).
    return out * _rows_to_out(weight, varlen).to(out.dtype), lse_sink


class _AttentionWithSinks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, varlen, ops):
        out, lse = ops[0](q, k, v)
        out, lse = _with_sink(out, lse, sinks, varlen)
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.varlen, ctx.ops = varlen, ops
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = ctx.ops[1](dout, q, k, v, out, lse)
        dsinks = None
        if ctx.needs_input_grad[3]:
            delta = (dout.float() * out.float()).sum(-1)  # [batch, heads, seq] or [tokens, heads]
            delta = delta if not ctx.varlen else delta.transpose(0, 1)
            sink_probability = torch.exp(_per_row(sinks, ctx.varlen) - lse)
            dims = (1,) if ctx.varlen else (0, 2)
            dsinks = -(sink_probability * delta).sum(dims).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None


def attention_with_sinks(q, k, v, sinks, varlen: bool, ops) -> torch.Tensor:
    """block_sparse_attention with ``sinks`` (checked by the caller). ``ops``: the backend's
    ``forward(q, k, v) -> (out, lse)`` and ``backward(dout, q, k, v, out, lse) -> (dq, dk, dv)``,
    the custom ops with every other argument bound."""
    return _AttentionWithSinks.apply(q, k, v, sinks, varlen, ops)
