"""FlashAttention-2's calling convention over block_sparse_attention: ``flash_attn_func`` and
``flash_attn_varlen_func``, for code written against the ``flash_attn`` package.

This is also how transformers drives a kernel-hub build of this package: for
``attn_implementation="<org>/<repo>:attention_forward"`` it loads the kernel, finds
``flash_attn_varlen_func`` on it, and calls these through its own flash-attention wrapper, which
unpads padded batches into varlen ones (README "Building", scripts/build_hub_kernel.sh).

Covered: self-attention (queries and keys of the same sequences), bidirectional or causal, a
sliding window given as ``window_size=(left, right)`` (-1 = unbounded; a causal window ignores
``right``), grouped-query attention, ``softmax_scale``. Queries fewer than the keys (decoding after
a KV cache: the causal mask aligned to the keys' end, as FlashAttention aligns it; or the
cross-attention of a bidirectional layer) have no tiles to skip and run in PyTorch's SDPA, one
sequence at a time in the varlen form. Logit soft-capping (``softcap``) is applied. Refused with a
clear error: dropout, ALiBi, the attention probabilities (``return_attn_probs``), asymmetric windows of a bidirectional
layer, and a window over another sequence's keys.
"""

from __future__ import annotations

import torch

from ..attention import block_sparse_attention
from .transformers.attention import (
    BLOCK_SIZE,
    attention_after_cache,
    cross_attention,
    layout_for,
    same_sequences,
    share_kv_heads,
    varlen_attention,
)

NAME = "modernbert_kernels.flash_attn"


def _window(window_size, causal: bool) -> int | None:
    left, right = (int(w) for w in window_size)
    if not causal and left != right:
        raise NotImplementedError(f"{NAME}: a bidirectional window must be symmetric, got window_size={window_size}")
    return None if left < 0 else left


def _check(dropout_p: float, alibi_slopes, return_attn_probs: bool, q: torch.Tensor, k: torch.Tensor) -> None:
    if return_attn_probs:
        raise NotImplementedError(f"{NAME}: the attention probabilities are never formed (return_attn_probs=True); "
                                  "pass False")
    if dropout_p:
        raise NotImplementedError(f"{NAME}: no attention dropout (dropout_p={dropout_p}); pass 0")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{NAME}: no ALiBi")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"{NAME}: {q.shape[-2]} query heads are not a multiple of {k.shape[-2]} key heads")


def _other_keys(q, k, v, window, causal, scale, softcap):
    """[batch, heads, seq, dim] queries whose keys are not their own tokens: the last queries of a
    causal sequence (after a KV cache), or a bidirectional layer's cross-attention."""
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"{NAME}: {q.shape[2]} queries but only {k.shape[2]} keys")
    if causal:
        return attention_after_cache(q, k, v, None, window, scale, softcap)
    if window is not None:
        raise NotImplementedError(f"{NAME}: a bidirectional window over another sequence's keys "
                                  f"({q.shape[2]} queries, {k.shape[2]} keys)")
    return cross_attention(q, k, v, None, scale, softcap)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> torch.Tensor:
    """q, k, v [batch, seq, heads, head_dim] (k, v may have fewer heads) -> [batch, seq, heads, head_dim]."""
    _check(dropout_p, alibi_slopes, return_attn_probs, q, k)
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0]:
        raise ValueError(f"{NAME}: q, k, v must be [batch, seq, heads, head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    k, v = share_kv_heads(q, k, v, head_axis=2)
    window = _window(window_size, causal)
    if k.shape[1] != q.shape[1]:
        return _other_keys(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, causal,
                           softmax_scale, softcap).transpose(1, 2)
    layout = layout_for(-(-q.shape[1] // BLOCK_SIZE), window, causal, q.device)
    out = block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, window=window,
                                 causal=causal, scale=softmax_scale, softcap=softcap)
    return out.transpose(1, 2)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False) -> torch.Tensor:
    """q, k, v [total_tokens, heads, head_dim], sequence b at cu_seqlens[b]:cu_seqlens[b + 1]."""
    _check(dropout_p, alibi_slopes, return_attn_probs, q, k)
    k, v = share_kv_heads(q, k, v, head_axis=1)
    window = _window(window_size, causal)
    if not same_sequences(cu_seqlens_q, cu_seqlens_k):
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"{NAME}: cu_seqlens_q and cu_seqlens_k must count the same sequences, got "
                             f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
        q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for q_start, q_end, k_start, k_end in zip(q_bounds, q_bounds[1:], k_bounds, k_bounds[1:]):
            rows = [t[start:end].transpose(0, 1)[None] for t, start, end in
                    ((q, q_start, q_end), (k, k_start, k_end), (v, k_start, k_end))]
            outs.append(_other_keys(*rows, window, causal, softmax_scale, softcap)[0].transpose(0, 1))
        return torch.cat(outs) if outs else torch.empty_like(q)
    return varlen_attention(q, k, v, cu_seqlens_q.to(torch.int32), int(max_seqlen_q), window, causal, softmax_scale,
                            softcap)
