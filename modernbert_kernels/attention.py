"""block_sparse_attention(): input checks, backend choice, and the torch.library custom ops.

The forward and backward are two custom ops (``modernbert_kernels::block_sparse_attention`` and
``..._backward``) with fake implementations, tied together by ``register_autograd``, so the op
works under autograd, ``torch.compile`` and ``opcheck``. Each op takes the backend name and
dispatches inside; the reference backend bypasses the ops and uses plain autograd.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import backends, torch_backend
from ._ops import ops
from .attention_sinks import attention_with_sinks
from .block_sparse_layout import BlockSparseLayout
from .global_attention import attention_with_global_tokens
from .reference import block_sparse_attention_reference, window_bounds
from .tensor_cache import TensorCache

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)  # every backend's; the Triton tile tables are built for these


@dataclasses.dataclass(frozen=True)
class AttentionKernels:
    """One backend's forward ``(q, k, v, row_offsets, col_indices, block_size, window_left,
    window_right, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen) -> (out, lse)`` and
    backward ``(dout, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
    block_size, window_left, window_right, scale, softcap, key_padding_mask, cu_seqlens,
    max_seqlen) -> (dq, dk, dv)``, run through the custom ops (query i sees key j only where
    ``-window_right <= i - j <= window_left``, -1 leaving a side unbounded: see
    reference.window_bounds; ``softcap`` 0 for none); or
    ``differentiable``, a function with block_sparse_attention's own signature that plain autograd
    differentiates (the reference)."""

    forward: Callable | None = None
    backward: Callable | None = None
    differentiable: Callable | None = None


ATTENTION = backends.op("block_sparse_attention")


def _triton_forward(q, k, v, row_offsets, col_indices, block_size, window_left, window_right, scale, softcap,
                    key_padding_mask, cu_seqlens, max_seqlen):
    from .triton.attention_kernel import attention_forward

    return attention_forward(
        q, k, v, (row_offsets, col_indices), block_size, row_offsets.shape[0], window=(window_left, window_right),
        scale=scale, softcap=softcap, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
    )


def _triton_backward(dout, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, block_size,
                     window_left, window_right, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen):
    from .triton.attention_kernel import attention_backward

    return attention_backward(
        dout, q, k, v, out, lse, (row_offsets, col_indices, col_offsets, row_indices), block_size,
        row_offsets.shape[0], window=(window_left, window_right), scale=scale, softcap=softcap, key_padding_mask=key_padding_mask,
        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
    )


def _native_forward(*args):
    return ops.block_sparse_attention_forward_native(*args)


def _native_backward(dout, *args):
    return ops.block_sparse_attention_backward_native(dout.contiguous(), *args)


def _torch_forward(q, k, v, row_offsets, col_indices, block_size, window_left, window_right, scale, softcap,
                   key_padding_mask, cu_seqlens, max_seqlen):
    return torch_backend.attention_forward(q, k, v, row_offsets, col_indices, block_size, (window_left, window_right),
                                           scale, softcap, key_padding_mask, cu_seqlens)


def _torch_backward(dout, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, block_size,
                    window_left, window_right, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen):
    return torch_backend.attention_backward(dout, q, k, v, out, lse, row_offsets, col_indices, block_size,
                                            (window_left, window_right), scale, softcap, key_padding_mask, cu_seqlens)


ATTENTION.add("triton", "forward, dq and dk/dv kernels (autotuned on GPUs)",
              AttentionKernels(_triton_forward, _triton_backward))
ATTENTION.add("cpu", "C++ forward and backward (dq pass, then dk/dv over the transposed layout)",
              AttentionKernels(_native_forward, _native_backward))
ATTENTION.add("cuda", "C++/CUDA forward, dq and dk/dv kernels", AttentionKernels(_native_forward, _native_backward))
ATTENTION.add("torch", "visited tiles in PyTorch (dense layouts on CPU: PyTorch's fused attention)",
              AttentionKernels(_torch_forward, _torch_backward))
ATTENTION.add("reference", "dense masked attention under plain autograd, the test oracle",
              AttentionKernels(differentiable=block_sparse_attention_reference))


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])


@backends.custom_op("block_sparse_attention")
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    row_offsets: torch.Tensor, col_indices: torch.Tensor, col_offsets: torch.Tensor, row_indices: torch.Tensor,
    block_size: int, window_left: int, window_right: int, scale: float, softcap: float,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse). Query i sees key j only where -window_right <= i - j <= window_left
    (-1: that side unbounded); softcap 0 leaves the scores uncapped."""
    if q.numel() == 0:  # no batch, head or token: nothing to launch (PyTorch's fused CPU kernel divides by zero)
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
            _lse_shape(q, cu_seqlens is not None), dtype=torch.float32)
    return ATTENTION[backend].forward(q, k, v, row_offsets, col_indices, block_size, window_left, window_right, scale,
                                      softcap, key_padding_mask, cu_seqlens, max_seqlen)


@_attention_op.register_fake
def _(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, window_left, window_right, scale,
      softcap, key_padding_mask, cu_seqlens, max_seqlen, backend):
    lse = q.new_empty(_lse_shape(q, cu_seqlens is not None), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@backends.custom_op("block_sparse_attention_backward")
def _attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    row_offsets: torch.Tensor, col_indices: torch.Tensor, col_offsets: torch.Tensor, row_indices: torch.Tensor,
    block_size: int, window_left: int, window_right: int, scale: float, softcap: float,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0:
        return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    return ATTENTION[backend].backward(dout, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
                                       block_size, window_left, window_right, scale, softcap, key_padding_mask,
                                       cu_seqlens, max_seqlen)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, block_size, window_left,
      window_right, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen, backend):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    (q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, window_left, window_right, scale,
     softcap, key_padding_mask, cu_seqlens, max_seqlen, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, key_padding_mask,
                          cu_seqlens)
    ctx.options = (block_size, window_left, window_right, scale, softcap, max_seqlen, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *layout_tensors, key_padding_mask, cu_seqlens = ctx.saved_tensors
    block_size, window_left, window_right, scale, softcap, max_seqlen, backend = ctx.options
    dq, dk, dv = backends.run(_attention_backward_op, dout, q, k, v, out, lse, *layout_tensors, block_size,
                              window_left, window_right, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen,
                              backend)
    return (dq, dk, dv) + (None,) * 13


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _reads_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int | None) -> bool:
    """Whether the input checks read cu_seqlens' values on the host.

    Never while compiling or capturing a CUDA graph (there are no values to read). On CUDA with
    ``max_seqlen`` given, not either: the read would be a device-to-host sync in every layer, so
    the values are trusted unless MODERNBERT_KERNELS_CHECK_CU_SEQLENS=1 asks for the check.
    Elsewhere the values are checked, once per tensor (see _checked_cu_seqlens).
    """
    if torch.compiler.is_compiling():
        return False
    if cu_seqlens.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return False
        return max_seqlen is None or os.environ.get("MODERNBERT_KERNELS_CHECK_CU_SEQLENS", "0") == "1"
    return True


# (total tokens) -> (longest sequence, whether all have one length), per cu_seqlens tensor: an
# encoder passes one cu_seqlens to every layer, so its values are read once per forward, not per layer.
_checked_lengths = TensorCache()


def _sequence_lengths(cu_seqlens: torch.Tensor, total_tokens: int) -> tuple[int, bool]:
    """(the longest sequence, whether all have one length), read once per cu_seqlens tensor."""
    return _checked_lengths.get(cu_seqlens, total_tokens, lambda: _read_sequence_lengths(cu_seqlens, total_tokens))


def _read_sequence_lengths(cu_seqlens: torch.Tensor, total_tokens: int) -> tuple[int, bool]:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total_tokens:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at total_tokens={total_tokens}, got {bounds[0]}..{bounds[-1]}"
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return max(lengths), min(lengths) == max(lengths)


def _checked_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int | None) -> int:
    """Check that cu_seqlens runs from 0 to ``total_tokens`` without decreasing; the longest
    sequence bounds ``max_seqlen``. Returns max_seqlen (the longest sequence when None)."""
    longest, _ = _sequence_lengths(cu_seqlens, total_tokens)
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest})")
    return max_seqlen


# The longest sequence up to which our CPU kernel runs bf16 dense attention where PyTorch's fused
# kernel is faster on long sequences (bf16 on AMX): at a few blocks the fixed costs of PyTorch's
# path dominate (NOTES, "The short query again").
SHORT_DENSE_TOKENS = 256


def _pytorch_dense_is_faster(q, k, v, seq_len: int, cu_seqlens) -> bool:
    """Whether PyTorch's fused CPU kernel runs this dense attention faster than ours, as measured:
    - fp32 with gradients: its fused backward beats ours;
    - the dtypes of DENSE_FORWARD_IN_OUR_CPU_KERNELS: ours;
    - bf16 elsewhere (AMX): PyTorch's on long sequences of one length (8 x 512 on a 2-core Xeon:
      11.8 against 15.4 ms); ours on sequences of up to SHORT_DENSE_TOKENS (1 x 16: 32 against 83 us;
      16 x 128: 2.1 against 2.8 ms), and on varlen batches of mixed lengths, which the torch path
      runs one sequence at a time (32 documents of 16-512 tokens: 7.1 against 12.9 ms);
    - fp16 (no CPU has fp16 units for ours to use): PyTorch's.
    """
    if q.dtype == torch.float32 and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return True
    if q.dtype in backends.DENSE_FORWARD_IN_OUR_CPU_KERNELS:
        return False
    if q.dtype != torch.bfloat16:
        return True
    if seq_len <= SHORT_DENSE_TOKENS:
        return False
    if cu_seqlens is None or torch.compiler.is_compiling():  # under compile the lengths are not known
        return True
    return _sequence_lengths(cu_seqlens, q.shape[0])[1]


def _check_global_tokens(global_tokens, q, varlen):
    expected = (q.shape[0],) if varlen else (q.shape[0], q.shape[2])
    if not isinstance(global_tokens, torch.Tensor) or global_tokens.dtype != torch.bool:
        raise TypeError(f"global_tokens must be a bool tensor {list(expected)} (True = global token), "
                        f"got {global_tokens.dtype if isinstance(global_tokens, torch.Tensor) else type(global_tokens).__name__}")
    if tuple(global_tokens.shape) != expected:
        what = "[total_tokens] with cu_seqlens" if varlen else "[batch, seq]"
        raise ValueError(f"global_tokens must be {what} = {expected}, got {tuple(global_tokens.shape)}")
    if global_tokens.device != q.device:
        raise ValueError(f"global_tokens is on {global_tokens.device} but q is on {q.device}")


def _checked_softcap(softcap, global_tokens) -> float:
    """softcap as the kernels take it: a float > 0, or 0 for no cap."""
    if softcap is None or softcap == 0:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be None, 0 or a finite number > 0, got {softcap!r}")
    if global_tokens is not None:
        raise ValueError("softcap with global_tokens is not supported: the global tokens' scores are not capped")
    return float(softcap)


def _check_sinks(sinks, q, varlen: bool, global_tokens):
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor [heads], got {type(sinks).__name__}")
    heads = q.shape[1] if not varlen else q.shape[-2]
    if sinks.shape != (heads,):
        raise ValueError(f"sinks must have shape ({heads},), one logit per head, got {tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be floating point, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}")
    if global_tokens is not None:
        raise ValueError("sinks with global_tokens is not supported: the global rows' softmax has no sink")


def _check_inputs(q, k, v, layout, window, causal, key_padding_mask, cu_seqlens, max_seqlen, global_tokens=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: fp16, bf16, fp32")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k, v must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}")
    varlen = cu_seqlens is not None
    expected_dims = 3 if varlen else 4
    if q.dim() != expected_dims:
        layout_name = "[total_tokens, heads, head_dim] with cu_seqlens" if varlen else "[batch, heads, seq, head_dim]"
        raise ValueError(f"q must be {layout_name}, got shape {tuple(q.shape)}")
    heads = q.shape[-2] if varlen else q.shape[1]
    if layout.num_heads not in (1, heads):
        raise ValueError(f"layout has {layout.num_heads} heads; q has {heads} (a layout must have 1 or {heads})")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
        raise ValueError(f"window must be None or an int >= 0, got {window!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")

    if varlen:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask and cu_seqlens exclude each other: varlen batches hold no padding")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError("cu_seqlens must be a 1-D int32 tensor [batch + 1]")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least 2 entries (batch + 1)")
        if _reads_cu_seqlens(cu_seqlens, max_seqlen):
            max_seqlen = _checked_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
        elif max_seqlen is None:
            raise ValueError("max_seqlen is required with cu_seqlens under torch.compile or CUDA-graph capture")
        elif not torch.compiler.is_compiling() and (
            not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0
        ):
            raise ValueError(f"max_seqlen must be an int >= 0, got {max_seqlen!r}")
        seq_len = max_seqlen
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens")
        seq_len = q.shape[2]
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor [batch, seq] (True = real token)")
            if tuple(key_padding_mask.shape) != (q.shape[0], seq_len):
                raise ValueError(
                    f"key_padding_mask must have shape {(q.shape[0], seq_len)}, got {tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.device != q.device:
                raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if global_tokens is not None:
        _check_global_tokens(global_tokens, q, varlen)
    covered = layout.num_blocks * layout.block_size
    if seq_len > covered:
        raise ValueError(
            f"layout covers {covered} tokens ({layout.num_blocks} blocks of {layout.block_size}) "
            f"but the sequence length is {seq_len}"
        )
    return seq_len


def _chosen_backend(q, k, v, layout, band, key_padding_mask, softcap, seq_len, cu_seqlens, backend):
    """The backend that runs this call: ``backend``, or the fastest for the inputs when None."""
    if backend is None:
        backend = ATTENTION.resolve(None, q.device)
        if (backend == "cpu" and band == (-1, -1) and key_padding_mask is None and not softcap
                and backends.layout_is_dense(layout, -(-seq_len // layout.block_size))
                and _pytorch_dense_is_faster(q, k, v, seq_len, cu_seqlens)):
            # Plain dense attention: the torch path hands it to PyTorch's fused CPU kernel where that
            # was measured faster than ours (benchmarks/NOTES.md). Ours wins on sparse work; PyTorch's
            # has no soft-capping.
            backend = "torch"
    backend = ATTENTION.resolve(backend, q.device)
    if backend == "triton" and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Triton's interpreter (numpy, which has no bf16) returns garbage from bf16 tl.dot: ~8e8 for
        # outputs of magnitude 4 with Triton 3.8. RoPE, quantization and the int8 linear are right there.
        raise TypeError("bf16 attention does not run in Triton's interpreter (TRITON_INTERPRET=1): its bf16 dot "
                        "products are wrong; use fp16 or fp32 there, or backend='cpu' / 'torch' for bf16")
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    window: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    global_tokens: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T, masked) v over the tiles ``layout`` visits.

    q, k, v: ``[batch, heads, seq, head_dim]``, or ``[total_tokens, heads, head_dim]`` with
    ``cu_seqlens`` (int32 ``[batch + 1]``; every sequence starts at position 0 of the layout).
    Query i sees key j when the layout visits their tile, ``|i - j| <= window`` (if given),
    ``j <= i`` (if ``causal``; with a window: ``0 <= i - j <= window``, a sliding-window decoder), and
    key j is real (``key_padding_mask[b, j]`` True; inside the sequence for varlen).
    ``global_tokens`` (bool, ``[batch, seq]``, or ``[total_tokens]`` with cu_seqlens) marks tokens,
    per example, that see every real key of their sequence and that every query of their sequence
    sees, whatever the layout and the band say (Longformer's global attention; see
    global_attention.py). A query that sees no key gets 0. fp16, bf16 or fp32; the output has q's
    dtype. The kernels are built for head_dim 32, 64, 128 and 256; other head dims up to 256 run
    zero-padded to the next of these (a copy of q, k and v; 96 costs what 128 does), and larger ones
    on the "torch" backend only (the default for them).
    ``softcap`` > 0 caps the scores as ``softcap * tanh(scale * q k^T / softcap)`` before the
    softmax (Gemma 2's logit soft-capping; None or 0: no cap), on every backend. ``sinks``
    (``[heads]``, GPT-OSS's attention sinks, differentiable) adds a logit per head to every row's
    softmax with no value: the rows' weights sum to less than 1 (attention_sinks.py).
    ``backend``: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cpu" / "cuda" (the C++
    extension's kernels), "torch" (visited tiles in PyTorch, any device) or "reference" (dense);
    None picks the fastest available for the device.
    """
    seq_len = _check_inputs(q, k, v, layout, window, causal, key_padding_mask, cu_seqlens, max_seqlen, global_tokens)
    softcap = _checked_softcap(softcap, global_tokens)
    if sinks is not None:
        _check_sinks(sinks, q, cu_seqlens is not None, global_tokens)
    head_dim = q.shape[-1]
    if head_dim > SUPPORTED_HEAD_DIMS[-1]:
        # Past the kernels' largest head_dim only the PyTorch paths run.
        if backend is None:
            backend = "torch"
        elif backend not in ("torch", "reference"):
            raise ValueError(f"head_dim {head_dim} runs on the 'torch' and 'reference' backends only: the "
                             f"{backend} kernels are built for head dims up to {SUPPORTED_HEAD_DIMS[-1]}")
    kernel_head_dim = head_dim if head_dim in SUPPORTED_HEAD_DIMS else next(
        (d for d in (0,) + SUPPORTED_HEAD_DIMS if d >= head_dim), head_dim)
    if kernel_head_dim != head_dim:
        # The kernels are built for SUPPORTED_HEAD_DIMS. Zeros appended to q, k and v change no score and
        # give zero columns after the output's own, so another head_dim runs padded to the next.
        padded = (F.pad(t, (0, kernel_head_dim - head_dim)) for t in (q, k, v))
        return block_sparse_attention(
            *padded, layout, window=window, causal=causal, scale=head_dim ** -0.5 if scale is None else scale,
            key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            global_tokens=global_tokens, softcap=softcap, sinks=sinks, backend=backend)[..., :head_dim]
    band = window_bounds(window, causal)
    backend = _chosen_backend(q, k, v, layout, band, key_padding_mask, softcap, seq_len, cu_seqlens, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kernels = ATTENTION[backend]
    if kernels.differentiable is not None:
        return kernels.differentiable(
            q, k, v, layout, window=window, scale=scale, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
            causal=causal, global_tokens=global_tokens, softcap=softcap, sinks=sinks,
        )
    if backend in backends.NATIVE_BACKENDS and key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        # Kernels address rows through strides but need unit stride along head_dim.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    options = (*layout.tensors_on(q.device), layout.block_size, *band, scale, softcap, key_padding_mask, cu_seqlens,
               seq_len if cu_seqlens is not None else 0, backend)
    if global_tokens is None and sinks is None:
        return backends.run(_attention_op, q, k, v, *options)[0]
    ops = (lambda q, k, v: backends.run(_attention_op, q, k, v, *options),
           lambda dout, q, k, v, out, lse: backends.run(_attention_backward_op, dout, q, k, v, out, lse, *options))
    if sinks is not None:
        return attention_with_sinks(q, k, v, sinks, cu_seqlens is not None, ops)
    return attention_with_global_tokens(q, k, v, global_tokens, layout, band, scale, key_padding_mask, cu_seqlens,
                                        ops)


def bind_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    window: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``block_sparse_attention`` split into a plan and its runs: the checks and the backend choice
    are made here once, on q, k, v and the rest, and the returned ``run(q, k, v)`` computes the
    attention of any q, k, v of the same shapes, dtype and device with the same layout, window,
    mask and lengths, checking only those. For an encoder's layers, each of which would otherwise
    repeat the previous layer's checks (tens of microseconds a call, as much as the kernel on a
    short query; NOTES "A frozen encoder"). Global tokens and sinks are not bound: call
    ``block_sparse_attention`` for them. Inputs that need a gradient run it too, whole."""
    seq_len = _check_inputs(q, k, v, layout, window, causal, key_padding_mask, cu_seqlens, max_seqlen)
    softcap = _checked_softcap(softcap, None)
    arguments = dict(window=window, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, softcap=softcap, backend=backend)
    band = window_bounds(window, causal)
    backend = _chosen_backend(q, k, v, layout, band, key_padding_mask, softcap, seq_len, cu_seqlens, backend)
    # The reference backend and padded head dims run the whole op at every call.
    whole_op = q.shape[-1] not in SUPPORTED_HEAD_DIMS or ATTENTION[backend].differentiable is not None
    if backend in backends.NATIVE_BACKENDS and key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    options = (*layout.tensors_on(q.device), layout.block_size, *band, scale, softcap, key_padding_mask, cu_seqlens,
               seq_len if cu_seqlens is not None else 0, backend)
    shape, dtype, device = q.shape, q.dtype, q.device

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for t in (q, k, v):
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise ValueError(f"this bound attention takes {dtype} inputs of shape {tuple(shape)} on {device}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        if whole_op or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return block_sparse_attention(q, k, v, layout, **arguments)
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return backends.run(_attention_op, q, k, v, *options)[0]

    # What a native caller (the encoder layer, encoder_layer.py) passes the C++ attention itself:
    # packed tokens on the C++ CPU kernel, without a padding mask or a softcap.
    native = backend == "cpu" and not whole_op and cu_seqlens is not None and key_padding_mask is None and not softcap
    row_offsets, col_indices = options[:2]
    run.native_arguments = NativeAttentionArguments(row_offsets, col_indices, layout.block_size, *band, scale,
                                                    cu_seqlens, seq_len) if native else None
    return run


class NativeAttentionArguments(NamedTuple):
    """A bound attention's arguments as the C++ CPU attention takes them (``bind_attention``'s
    ``run.native_arguments``): the layout's CSR, its block size, the band (-1: unbounded side),
    the scale, and the packed batch's lengths."""

    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    block_size: int
    window_left: int
    window_right: int
    scale: float
    cu_seqlens: torch.Tensor
    max_seqlen: int
