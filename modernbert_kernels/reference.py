"""Plain PyTorch references of every op: dense math, no tricks. They are the oracle of the tests."""

from __future__ import annotations

import math

import torch

from .block_sparse_layout import BlockSparseLayout


def window_bounds(window: int | None, causal: bool) -> tuple[int, int]:
    """(left, right) of the band the kernels mask to: query i sees key j only where
    ``-right <= i - j <= left``; -1 leaves that side unbounded. ``window`` bounds both sides
    (|i - j| <= window), ``causal`` closes the right side (j <= i)."""
    left = -1 if window is None else window
    return left, 0 if causal else left


def attention_mask(
    layout: BlockSparseLayout,
    seq_len: int,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    global_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[batch or 1, heads or 1, seq_len, seq_len]``: True where query i sees key j.

    ``global_tokens`` ``[batch, seq_len]``: a global query sees every key, a global key is seen by
    every query, whatever the layout and the band say; padding stays unseen."""
    mask = layout.to_dense_mask(seq_len)[None]
    pos = torch.arange(seq_len)
    distance = pos[:, None] - pos[None, :]  # query - key
    if window is not None:
        mask = mask & (distance.abs() <= window)
    if causal:
        mask = mask & (distance >= 0)
    if global_tokens is not None:
        g = global_tokens.to("cpu", torch.bool)
        mask = mask | g[:, None, :, None] | g[:, None, None, :]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to("cpu", torch.bool)[:, None, None, :]
    return mask


def _dense_masked_attention(q, k, v, mask, scale, softcap=None, sinks=None):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    # A finite fill (not -inf) keeps rows that see no key free of NaN in forward and backward;
    # multiplying by the mask afterwards turns their uniform softmax into zeros.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1) * mask
    else:  # one more column per row, the head's sink logit, whose probability multiplies no value
        sink_column = sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink_column], -1), dim=-1)[..., :-1] * mask
    return torch.matmul(probs, v)


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    window: int | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = False,
    global_tokens: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention with the layout's token mask; same shapes and semantics as the kernels
    (``softcap``: scores capped as softcap * tanh(scores / softcap) before the softmax; ``sinks``
    [heads]: a logit per head in every row's softmax, with no value)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_seqlens is None:
        mask = attention_mask(layout, q.shape[2], window, key_padding_mask, causal, global_tokens).to(q.device)
        return _dense_masked_attention(q, k, v, mask, scale, softcap, sinks)
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        seq = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        seq_globals = None if global_tokens is None else global_tokens[None, start:end]
        mask = attention_mask(layout, end - start, window, causal=causal, global_tokens=seq_globals).to(q.device)
        outputs.append(_dense_masked_attention(*seq, mask, scale, softcap, sinks)[0].transpose(0, 1))
    return torch.cat(outputs, 0)


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero: the rule the quantization kernels use."""
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


def quantize_per_row_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, in float64: (q as int8, scale as float64)."""
    x = x.double()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, 1.0)
    return round_half_away(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_matmul_reference(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """The exact integer product x_q @ w_q.T in int64."""
    return torch.matmul(x_q.long(), w_q.long().t())


def int8_linear_reference(x_q, x_scale, w_q, w_scale, bias=None, activation=None, residual=None) -> torch.Tensor:
    """act(x_scale[m] w_scale[n] (x_q @ w_q.T) + bias) (+ residual) in float64; geglu takes interleaved
    rows."""
    y = int8_matmul_reference(x_q, w_q).double() * x_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    elif activation == "geglu":
        y = torch.nn.functional.gelu(y[:, 0::2]) * y[:, 1::2]
    return y if residual is None else y + residual.double()


def rotary_embedding_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split layout, in float64: x [tokens, ..., head_dim], cos / sin [tokens, head_dim / 2].

    Written as transformers writes it (x * cos + rotate_half(x) * sin with the angles repeated over
    both halves), not as the kernels do (a 2 x 2 rotation per pair), so the two can disagree.
    """
    x = x.double()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    cos_full = torch.cat((cos, cos), dim=-1).double().reshape(shape)
    sin_full = torch.cat((sin, sin), dim=-1).double().reshape(shape)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_full + torch.cat((-x2, x1), dim=-1) * sin_full
