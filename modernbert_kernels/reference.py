"""Plain PyTorch references of every op: dense math, no tricks. They are the oracle of the tests."""

from __future__ import annotations

import math

import torch

from .layout import BlockSparseLayout


def attention_mask(
    layout: BlockSparseLayout,
    seq_len: int,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[batch or 1, heads or 1, seq_len, seq_len]``: True where query i sees key j."""
    mask = layout.to_dense_mask(seq_len)[None]
    if window is not None:
        pos = torch.arange(seq_len)
        mask = mask & ((pos[:, None] - pos[None, :]).abs() <= window)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to("cpu", torch.bool)[:, None, None, :]
    return mask


def _dense_masked_attention(q, k, v, mask, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    # A finite fill (not -inf) keeps rows that see no key free of NaN in forward and backward;
    # multiplying by the mask afterwards turns their uniform softmax into zeros.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * mask
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
) -> torch.Tensor:
    """Dense attention with the layout's token mask; same shapes and semantics as the kernels."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_seqlens is None:
        mask = attention_mask(layout, q.shape[2], window, key_padding_mask).to(q.device)
        return _dense_masked_attention(q, k, v, mask, scale)
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        seq = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        mask = attention_mask(layout, end - start, window).to(q.device)
        outputs.append(_dense_masked_attention(*seq, mask, scale)[0].transpose(0, 1))
    return torch.cat(outputs, 0)
