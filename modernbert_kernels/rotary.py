"""rotary_embedding(): rotary position embedding (RoPE, half-split pairs) of q and k, in one pass.

Every row ``x[t, ..., :]`` is turned pair by pair: ``(x_i, x_{i+D/2}) -> (x_i cos - x_{i+D/2} sin,
x_{i+D/2} cos + x_i sin)`` with token t's angles. Two custom ops: ``rotary_embedding`` (a new tensor,
differentiable: the gradient is the rotation by the opposite angles) and ``rotary_embedding_`` (in
place, for inference: no output allocation, which on CPU costs more than the arithmetic, see
benchmarks/NOTES.md). ``backend``: "triton", "cpu" / "cuda" (the C++ extension) or "torch".
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import backends
from ._ops import ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


ROTARY = backends.op("rotary_embedding")


@ROTARY.implements("triton", "one pass over q and k, both halves of each pair in registers")
def _rotate_triton(x, cos, sin, out):
    from .triton.rotary import rotary

    rotary(x, cos, sin, out)


def _rotate_native(x, cos, sin, out):
    ops.rotary_embedding_native(x, cos, sin, out)


ROTARY.add("cpu", "C++ one pass, vectorized per row", _rotate_native)
ROTARY.add("cuda", "C++/CUDA one pass", _rotate_native)


@ROTARY.implements("torch", "PyTorch ops (addcmul per half)")
def _rotate_torch(x, cos, sin, out):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None], sin[:, None]
    # Both halves are computed before either is written: out may be x.
    y1, y2 = torch.addcmul(x1 * c, x2, s, value=-1), torch.addcmul(x2 * c, x1, s)
    out[..., :half] = y1
    out[..., half:] = y2


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """x, out [tokens, groups, head_dim]; out may be x."""
    if x.numel():  # an empty tensor's strides need not be a row layout the kernels accept
        ROTARY[backend](x, cos, sin, out)


@backends.custom_op("rotary_embedding")
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _rotate(x, cos, sin, out, backend)
    return out


@_rotary_op.register_fake
def _(x, cos, sin, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, cos, sin, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backend = backend


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    # A rotation's transpose is the rotation by the opposite angle: negate sin.
    return backends.run(_rotary_op, grad.contiguous(), cos, -sin, ctx.backend), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


@backends.custom_op("rotary_embedding_", mutates_args=("x",))
def _rotary_inplace_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> None:
    _rotate(x, cos, sin, x, backend)


def rotary_embedding(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate x [tokens, ..., head_dim] by the angles whose cos and sin are [tokens, head_dim / 2].

    The middle dimensions (e.g. ``[2, heads]`` for q and k sliced from a fused qkv) may be strided
    as long as they merge into one; head_dim needs unit stride. Computed in fp32, stored in x's
    dtype. ``inplace=True`` overwrites x (which must then not need a gradient) and returns it.
    """
    backend, cos, sin = _checked_inputs(x, cos, sin, inplace, backend)
    if inplace:
        backends.run(_rotary_inplace_op, _rows(x, inplace=True), cos, sin, backend)
        return x
    return backends.run(_rotary_op, _rows(x, inplace=False), cos, sin, backend).view(x.shape)


def bind_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                backend: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rotary_embedding(x, cos, sin, inplace=True)`` split into a plan and its runs: the checks
    and the backend choice are made here once, and the returned ``run(x)`` turns in place any x of
    this one's shape, strides, dtype and device by these angles, checking only those (for an
    encoder's layers, which all turn q and k by the same angles; NOTES "A frozen encoder")."""
    backend, cos, sin = _checked_inputs(x, cos, sin, True, backend)
    rows_shape = _rows(x, inplace=True).shape  # an x whose rows cannot be turned in place raises here
    shape, stride, dtype, device = x.shape, x.stride(), x.dtype, x.device

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape != shape or x.stride() != stride or x.dtype != dtype or x.device != device:
            raise ValueError(f"this bound rotary embedding takes {dtype} x of shape {tuple(shape)} and strides "
                             f"{stride} on {device}, got {x.dtype} {tuple(x.shape)}, {x.stride()} on {x.device}")
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError("inplace=True cannot record a gradient; use rotary_embedding when x requires grad")
        backends.run(_rotary_inplace_op, x.view(rows_shape), cos, sin, backend)
        return x

    return run


def _checked_inputs(x, cos, sin, inplace: bool, backend):
    """rotary_embedding's checks -> (the backend, cos and sin as the kernels read them)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be an fp16, bf16 or fp32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"x must be [tokens, ..., head_dim], got shape {tuple(x.shape)}")
    tokens, head_dim = x.shape[0], x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if tuple(t.shape) != (tokens, head_dim // 2):
            raise ValueError(f"{name} must be [tokens, head_dim / 2] = [{tokens}, {head_dim // 2}], got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise ValueError("inplace=True cannot record a gradient; use inplace=False when x requires grad")
    return ROTARY.resolve(backend, x.device), cos.float().contiguous(), sin.float().contiguous()


def _rows(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """x as [tokens, groups, head_dim] rows with unit stride along head_dim: a view where it must
    be written in place."""
    tokens, head_dim = x.shape[0], x.shape[-1]
    groups = math.prod(x.shape[1:-1])  # not -1: ambiguous when x is empty
    try:
        rows = x.view(tokens, groups, head_dim)  # a view: in-place writes reach x
    except RuntimeError:
        if inplace:
            raise ValueError(
                f"inplace=True needs x's middle dimensions to merge into one (shape {tuple(x.shape)}, "
                f"strides {x.stride()}); use inplace=False"
            ) from None
        rows = x.reshape(tokens, groups, head_dim)
    if rows.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs unit stride along head_dim")
        rows = rows.contiguous()
    return rows
