"""W8A8 int8 linear layers: quantization helpers, int8_linear(), int8_linear_dynamic(), Int8Linear.

Weights are quantized once per output channel; activations per token, on the fly (fused with the
LayerNorm that precedes them where the caller has one): ``quantize_per_token`` then ``int8_linear``,
or both as one op, ``int8_linear_dynamic`` (one native call on the C++ CPU backend). The ops are
torch.library custom ops with fake implementations; ``backend="triton"`` runs the Triton kernels (CUDA, or the interpreter),
``backend="cpu"`` / ``"cuda"`` the C++ extension's kernels (on CPU: an int8 GEMM in cache-sized
row chunks, each followed at once by a vectorized epilogue; the GEMM is the extension's AMX tile
kernel where the CPU has AMX-INT8, oneDNN's with VNNI), ``backend="torch"`` ``torch._int_mm`` plus
a PyTorch epilogue. The reference (float64) lives in reference.py.

On a CPU without an int8 dot-product instruction (x86 with AVX2 only: no VNNI, no AMX) oneDNN's
int8 GEMM is ~25x slower than an fp32 GEMM and saturates; there the C++ backend computes the same
int32 products with its own int16-pair kernel (pmaddwd), and the torch backend with an exact
floating-point GEMM (``cpu_int8_gemm``).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
from torch import nn

from . import backends
from ._ops import ops
from .encoder_layer import NativeLinear
from .tensor_cache import TensorCache

ACTIVATIONS = (None, "gelu", "gelu_tanh", "geglu")
INT8_MAX = 127.0
# The longest K whose int32 sums of int8 products cannot overflow: K x 128^2 <= 2^31.
MAX_K = 2**31 // 128**2


def _quantize_rows_torch(x, norm_weight, eps, smooth):
    x = x.float()
    if norm_weight is not None:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], norm_weight.float(), None, eps)
    if smooth is not None:
        x = x * smooth
    low, high = torch.aminmax(x, dim=-1)  # one pass instead of abs() then amax()
    amax = torch.maximum(-low, high)
    # A row holding a NaN or an Inf gets scale NaN (and zeros): the linear's output row is NaN.
    non_finite = ~(torch.isfinite(low) & torch.isfinite(high))  # aminmax propagates NaN
    scale = torch.where(non_finite, float("nan"), torch.where(amax > 0, amax / INT8_MAX, 1.0))
    scaled = x / scale[:, None]
    # Shift by +-0.5 and let the int8 cast truncate toward zero: round half away from zero,
    # the rule of the kernels and the reference, in two passes.
    scaled.add_(torch.full((), 0.5).copysign(scaled)).clamp_(-INT8_MAX, INT8_MAX)
    return scaled.masked_fill_(non_finite[:, None], 0.0).to(torch.int8), scale


QUANTIZE = backends.op("quantize_per_token")
QUANTIZE.add("torch", "PyTorch ops (aminmax, one rounding pass)", _quantize_rows_torch)


@QUANTIZE.implements("triton", "one program per row, LayerNorm and smoothing fused")
def _quantize_rows_triton(x, norm_weight, eps, smooth):
    from .triton.quantize import quantize_rows

    return quantize_rows(x, norm_weight, eps, smooth)


def _quantize_rows_native(x, norm_weight, eps, smooth):
    return ops.quantize_per_token_native(x, norm_weight, eps, smooth)


QUANTIZE.add("cpu", "C++ rows in parallel, LayerNorm and smoothing fused", _quantize_rows_native)
QUANTIZE.add("cuda", "C++/CUDA, a block per row", _quantize_rows_native)


@backends.custom_op("quantize_per_token")
def _quantize_op(
    x: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float, smooth: Optional[torch.Tensor], backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:  # no rows, or rows of no columns: all-zero rows, scale 1
        return x.new_empty(x.shape, dtype=torch.int8), x.new_ones(x.shape[0], dtype=torch.float32)
    return QUANTIZE[backend](x, norm_weight, eps, smooth)


@_quantize_op.register_fake
def _(x, norm_weight, eps, smooth, backend):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


def quantize_per_token(
    x: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    smooth: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: x [M, K] -> (int8 [M, K], fp32 scales [M]), x ~= q * scale[:, None].

    ``norm_weight`` fuses a bias-free LayerNorm before quantizing; ``smooth`` [K] multiplies the
    columns first (SmoothQuant's 1/s). All-zero rows get scale 1 and zeros.
    """
    _check_quantize_inputs(x, norm_weight, smooth)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return backends.run(_quantize_op, x, norm_weight, eps, smooth, QUANTIZE.resolve(backend, x.device))


def _check_quantize_inputs(x, norm_weight, smooth) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    for name, t in (("norm_weight", norm_weight), ("smooth", smooth)):
        if t is not None and (t.shape != (x.shape[1],) or t.device != x.device):
            raise ValueError(f"{name} must be [{x.shape[1]}] on {x.device}, got {tuple(t.shape)} on {t.device}")
    if smooth is not None and smooth.dtype != torch.float32:
        raise TypeError(f"smooth must be float32, got {smooth.dtype}")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [N, K] -> (int8 [N, K], fp32 scales [N]); done once, so plain PyTorch."""
    if w.dim() != 2:
        raise ValueError(f"w must be [N, K], got shape {tuple(w.shape)}")
    return backends.run(_quantize_op, w.detach(), None, 0.0, None, "torch")


def _epilogue_torch(acc, x_scale, w_scale, bias, activation, out_dtype, residual=None):
    # Convert, then scale in place: a mixed int32 * fp32 multiply takes a slow casting path.
    y = acc.float().mul_(w_scale).mul_(x_scale[:, None])
    if bias is not None:
        y.add_(bias)
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    elif activation == "geglu":
        pairs = y.view(y.shape[0], y.shape[1] // 2, 2)
        y = torch.nn.functional.gelu(pairs[..., 0]) * pairs[..., 1]
    if residual is not None:
        y.add_(residual)  # y is this call's own fresh tensor
    return y.to(out_dtype)


@functools.cache
def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU has an int8 dot-product instruction oneDNN's int8 GEMM is fast with (x86:
    AVX512-VNNI, AVX-VNNI or AMX-INT8; other architectures are assumed to)."""
    capabilities = backends.cpu_capabilities()
    if capabilities.get("architecture") != "x86_64":
        return True
    return any(capabilities.get(flag) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@functools.cache
def cpu_int8_gemm_is_exact() -> bool:
    """Whether oneDNN's int8 GEMM (torch._int_mm) sums int8 products exactly here. With VNNI or AMX
    each product accumulates in int32; without them oneDNN multiplies u8 x s8 pairs whose sums
    saturate at int16 (vpmaddubsw), a path ONEDNN_MAX_CPU_ISA below VNNI selects on any CPU. So a
    product that would saturate is tried once (a build without a CPU int8 GEMM fails it). The C++
    backend makes the same test."""
    x = torch.full((32, 64), 127, dtype=torch.int8)
    try:
        return bool((torch._int_mm(x, x.t().contiguous()) == 127 * 127 * 64).all())
    except RuntimeError:
        return False


def cpu_int8_gemm(backend: str = "torch") -> str:
    """The GEMM of int8_linear on this CPU with ``backend`` ("torch" or "cpu"):

    - "amx": the C++ backend's AMX tile kernel, where the CPU has AMX-INT8 and the OS allows it;
    - "int8": oneDNN's int8 GEMM, where the CPU has an int8 dot product and it is exact;
    - "int16": the C++ backend's exact int16-pair kernel (x86 without an int8 dot product);
    - "float": exact fp32 GEMMs of the int8 values (the torch backend without one).

    MODERNBERT_KERNELS_CPU_INT8_GEMM=amx|int8|int16|float forces one (read per call); forcing a
    GEMM that is not exact here, or that the backend does not have, is refused."""
    if backend == "cpu":
        return ops.cpu_int8_gemm()  # the C++ backend makes the choice, and checks the setting, itself
    forced = os.environ.get("MODERNBERT_KERNELS_CPU_INT8_GEMM", "auto")
    if forced not in ("auto", "amx", "int8", "int16", "float"):
        raise ValueError(f"MODERNBERT_KERNELS_CPU_INT8_GEMM must be auto, amx, int8, int16 or float, not {forced!r}")
    if forced == "int8" and not cpu_int8_gemm_is_exact():
        raise RuntimeError("MODERNBERT_KERNELS_CPU_INT8_GEMM=int8, but oneDNN's int8 GEMM does not sum int8 products "
                           "exactly on this CPU (no VNNI / AMX, or ONEDNN_MAX_CPU_ISA below them): use float or auto")
    if forced in ("amx", "int16"):
        raise RuntimeError(f"MODERNBERT_KERNELS_CPU_INT8_GEMM={forced} is the C++ backend's GEMM (backend='cpu'); the "
                           "torch backend runs int8 or float")
    if forced != "auto":
        return forced
    return "int8" if cpu_has_int8_dot_product() and cpu_int8_gemm_is_exact() else "float"


# int8 x int8 products are integers of magnitude <= 127^2 < 2^14, so an fp32 GEMM sums up to this
# many of them exactly (every partial sum below 2^24).
EXACT_FP32_K = (2**24 - 1) // 127**2  # 1040


def exact_fp32_parts(k: int) -> list[slice]:
    """K split into the fewest equal parts an fp32 GEMM sums exactly: their int32 sum is the product.
    (fp64 would be exact in one GEMM, at half the rate or less.)"""
    parts = -(-k // EXACT_FP32_K)
    size = -(-k // parts)
    return [slice(start, min(start + size, k)) for start in range(0, k, size)]


def _int_mm(x_q, w_q):
    m, k = x_q.shape
    if x_q.device.type == "cpu" and cpu_int8_gemm() == "float":
        x, w = x_q.float(), w_q.float()
        return sum(torch.matmul(x[:, part], w[:, part].t()).int() for part in exact_fp32_parts(k))
    # torch._int_mm has shape limits (on CUDA: M > 16, K and N multiples of 8); small problems
    # take the exact int32 matmul.
    if m > 16 and k % 8 == 0 and w_q.shape[0] % 8 == 0:
        return torch._int_mm(x_q, w_q.t())
    return torch.matmul(x_q.int(), w_q.int().t())


INT8_LINEAR = backends.op("int8_linear")


@INT8_LINEAR.implements("triton", "int8 tensor-core GEMM; dequantization, bias, activation and residual in the "
                        "epilogue")
def _int8_linear_triton(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, residual):
    from .triton.int8_matmul import int8_matmul

    return int8_matmul(x_q, w_q, x_scale, w_scale, bias, None if activation == "none" else activation, out_dtype,
                       residual=residual)


def _int8_linear_native(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, residual, w_packed=None):
    return ops.int8_linear_native(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, residual, w_packed)


INT8_LINEAR.add("cpu", "its own AMX-INT8 GEMM, else oneDNN's int8 GEMM (an exact int16-pair GEMM without VNNI / "
                "AMX), in cache-sized blocks, each with its vectorized epilogue", _int8_linear_native)
INT8_LINEAR.add("cuda", "WMMA int8 GEMM with the fused epilogue (residual included)", _int8_linear_native)


@INT8_LINEAR.implements("torch", "torch._int_mm (exact float GEMM on CPUs without VNNI / AMX), then the epilogue "
                        "in PyTorch")
def _int8_linear_torch(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, residual):
    return _epilogue_torch(_int_mm(x_q, w_q), x_scale, w_scale, bias, None if activation == "none" else activation,
                           out_dtype, residual)


@backends.custom_op("int8_linear")
def _int8_linear_op(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: Optional[torch.Tensor], activation: str, out_dtype: torch.dtype, backend: str,
    residual: Optional[torch.Tensor] = None, w_packed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if x_q.numel() == 0 or w_q.numel() == 0:  # an empty product: act(bias), as nn.Linear gives; no kernel launch
        empty = torch.zeros(x_q.shape[0], w_q.shape[0], device=x_q.device, dtype=torch.int32)
        return _epilogue_torch(empty, x_scale, w_scale, bias, None if activation == "none" else activation, out_dtype,
                               residual)
    if w_packed is not None and backend == "cpu":
        return _int8_linear_native(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, residual, w_packed)
    return INT8_LINEAR[backend](x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, residual)


@_int8_linear_op.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, backend, residual=None, w_packed=None):
    cols = w_q.shape[0] // 2 if activation == "geglu" else w_q.shape[0]
    return x_q.new_empty(x_q.shape[0], cols, dtype=out_dtype)


def int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
    residual: torch.Tensor | None = None,
    packed_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x_scale[m] * w_scale[n] * (x_q @ w_q.T)[m, n] + bias[n]) (+ residual[m, n]) as ``out_dtype``.

    x_q [M, K] int8, x_scale [M] fp32, w_q [N, K] int8, w_scale [N] fp32, bias [N] or None;
    K must be a multiple of 16. ``activation="geglu"`` expects the weight rows interleaved
    (see ``interleave_geglu``) and returns [M, N / 2]. ``residual`` (the output's shape and dtype) is
    added in the epilogue, after the activation: a residual connection without a pass of its own.
    ``packed_weight`` (``int8_pack_weight(w_q)``, made once) spares the C++ CPU backend packing w_q
    on every call; other backends read w_q and ignore it.
    """
    # One test of all four operands' types, dtypes and devices; the error names the first wrong one.
    if not (isinstance(x_q, torch.Tensor) and isinstance(w_q, torch.Tensor) and isinstance(x_scale, torch.Tensor)
            and isinstance(w_scale, torch.Tensor) and x_q.dtype == torch.int8 and w_q.dtype == torch.int8
            and x_scale.dtype == torch.float32 and w_scale.dtype == torch.float32
            and x_q.device == w_q.device == x_scale.device == w_scale.device):
        _raise_for_operands((("x_q", x_q, torch.int8), ("w_q", w_q, torch.int8), ("x_scale", x_scale, torch.float32),
                             ("w_scale", w_scale, torch.float32)), "x_q", x_q)
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"x_q [M, K] and w_q [N, K] must share K, got {tuple(x_q.shape)} and {tuple(w_q.shape)}")
    if x_scale.shape != (x_q.shape[0],) or w_scale.shape != (w_q.shape[0],):
        raise ValueError(f"x_scale must be [{x_q.shape[0]}] and w_scale [{w_q.shape[0]}], got {tuple(x_scale.shape)}, "
                         f"{tuple(w_scale.shape)}")
    backend, residual, packed_weight = _check_linear_inputs(x_q.shape[0], x_q.device, w_q, bias, activation, out_dtype,
                                                            residual, packed_weight, backend)
    return backends.run(_int8_linear_op, x_q.contiguous(), x_scale.contiguous(), w_q.contiguous(),
                        w_scale.contiguous(), bias, activation or "none", out_dtype, backend, residual, packed_weight)


def _check_linear_inputs(m, device, w_q, bias, activation, out_dtype, residual, packed_weight, backend):
    """The checks int8_linear and int8_linear_dynamic share, past their inputs' own (w_q [N, K]
    int8 and w_scale [N] fp32 on ``device``): -> (the backend, residual made contiguous, the packed
    weight or None where the backend does not read it)."""
    k, n = w_q.shape[1], w_q.shape[0]
    if k % 16:
        raise ValueError(f"K = {k} must be a multiple of 16 (int8 tensor-core tiles)")
    if k > MAX_K:
        raise ValueError(f"K = {k} is above {MAX_K}: int32 sums of K int8 products could overflow")
    if bias is not None and (bias.shape != (n,) or bias.device != device):
        raise ValueError(f"bias must be [{n}] on {device}, got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "geglu" and n % 2:
        raise ValueError(f"geglu needs an even number of weight rows, got {n}")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"out_dtype must be fp16, bf16 or fp32, got {out_dtype}")
    if residual is not None:
        out_shape = (m, n // 2 if activation == "geglu" else n)
        if not isinstance(residual, torch.Tensor) or residual.dtype != out_dtype:
            raise TypeError(f"residual must be a {out_dtype} tensor (out_dtype), got "
                            f"{getattr(residual, 'dtype', type(residual).__name__)}")
        if residual.shape != out_shape or residual.device != device:
            raise ValueError(f"residual must be {list(out_shape)} on {device}, got {tuple(residual.shape)} on "
                             f"{residual.device}")
        residual = residual.contiguous()
    backend = INT8_LINEAR.resolve(backend, device)
    if packed_weight is not None:
        if not isinstance(packed_weight, torch.Tensor) or packed_weight.dtype != torch.int8 or packed_weight.dim() != 1:
            raise TypeError("packed_weight must be what int8_pack_weight(w_q) returned (a 1-D int8 tensor), got "
                            f"{getattr(packed_weight, 'dtype', type(packed_weight).__name__)}")
        if backend != "cpu":
            packed_weight = None  # the CPU GEMM's layout; the other backends read w_q
    return backend, residual, packed_weight


def _raise_for_operands(operands, reference_name: str, reference) -> None:
    """The error for the first of ``operands`` ((name, tensor, dtype), ...) of the wrong type or
    dtype, or on another device than ``reference``."""
    for name, t, dtype in operands:
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            raise TypeError(f"{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


@backends.custom_op("int8_linear_dynamic")
def _int8_linear_dynamic_op(
    x: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float, smooth: Optional[torch.Tensor],
    w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], activation: str, out_dtype: torch.dtype,
    backend: str, residual: Optional[torch.Tensor] = None, w_packed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if backend == "cpu" and x.numel() and w_q.numel():
        # One native call: the quantized copy of x is made and used inside it.
        return ops.int8_linear_dynamic_native(x, norm_weight, eps, smooth, w_q, w_scale, bias, activation, out_dtype,
                                              residual, w_packed)
    x_q, x_scale = backends.run(_quantize_op, x, norm_weight, eps, smooth, backend)
    return backends.run(_int8_linear_op, x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, backend, residual,
                        w_packed)


@_int8_linear_dynamic_op.register_fake
def _(x, norm_weight, eps, smooth, w_q, w_scale, bias, activation, out_dtype, backend, residual=None, w_packed=None):
    cols = w_q.shape[0] // 2 if activation == "geglu" else w_q.shape[0]
    return x.new_empty(x.shape[0], cols, dtype=out_dtype)


def int8_linear_dynamic(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    smooth: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    packed_weight: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``int8_linear(*quantize_per_token(x, norm_weight=, eps=, smooth=), w_q, w_scale, ...)`` as one op:
    x [M, K] floating point, quantized per row on the fly (after the fused bias-free LayerNorm and
    smoothing, if given), then the int8 linear; ``out_dtype`` defaults to x's. The C++ CPU backend
    does both in one native call; the others run the two ops. What ``Int8Linear`` calls."""
    w_q, w_scale, bias, activation, out_dtype, backend, residual, packed_weight = _checked_int8_linear_dynamic(
        x, w_q, w_scale, bias, activation, out_dtype, norm_weight, smooth, residual, packed_weight, backend)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return backends.run(_int8_linear_dynamic_op, x, norm_weight, eps, smooth, w_q, w_scale, bias, activation, out_dtype,
                        backend, residual, packed_weight)


def _checked_int8_linear_dynamic(x, w_q, w_scale, bias, activation, out_dtype, norm_weight, smooth, residual,
                                 packed_weight, backend):
    """int8_linear_dynamic's checks -> its op's arguments past x, norm_weight, eps and smooth:
    (w_q, w_scale, bias, activation, out_dtype, backend, residual, packed_weight)."""
    _check_quantize_inputs(x, norm_weight, smooth)
    if not (isinstance(w_q, torch.Tensor) and isinstance(w_scale, torch.Tensor) and w_q.dtype == torch.int8
            and w_scale.dtype == torch.float32 and w_q.device == w_scale.device == x.device):
        _raise_for_operands((("w_q", w_q, torch.int8), ("w_scale", w_scale, torch.float32)), "x", x)
    if w_q.dim() != 2 or x.shape[1] != w_q.shape[1]:
        raise ValueError(f"x [M, K] and w_q [N, K] must share K, got {tuple(x.shape)} and {tuple(w_q.shape)}")
    if w_scale.shape != (w_q.shape[0],):
        raise ValueError(f"w_scale must be [{w_q.shape[0]}], got {tuple(w_scale.shape)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    backend, residual, packed_weight = _check_linear_inputs(x.shape[0], x.device, w_q, bias, activation, out_dtype,
                                                            residual, packed_weight, backend)
    return (w_q.contiguous(), w_scale.contiguous(), bias, activation or "none", out_dtype, backend, residual,
            packed_weight)


def int8_pack_weight(w_q: torch.Tensor) -> torch.Tensor:
    """w_q ([N, K] int8, on the CPU) in the layout the C++ CPU backend's GEMM reads (its AMX tile
    kernel's or its int16-pair kernel's; a header alone for oneDNN's, which reads w_q as it is), for
    ``int8_linear(..., packed_weight=)``. At a few tokens a call, packing w_q is most of the call's
    time, so a weight used for many calls is packed once (``Int8Linear`` does this itself).
    The copy names the weight's shape and the GEMM it was made for: int8_linear refuses it for
    another shape, and packs w_q itself while another GEMM is forced
    (MODERNBERT_KERNELS_CPU_INT8_GEMM). It does not follow later changes to w_q."""
    if not isinstance(w_q, torch.Tensor) or w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise TypeError(f"w_q must be an [N, K] int8 tensor, got {getattr(w_q, 'dtype', type(w_q).__name__)} "
                        f"of shape {tuple(getattr(w_q, 'shape', ()))}")
    if w_q.device.type != "cpu":
        raise ValueError(f"int8_pack_weight makes the CPU backend's layout; w_q is on {w_q.device}")
    INT8_LINEAR.resolve("cpu", w_q.device)  # a clear error where the C++ extension is not built
    return ops.int8_pack_weight_native(w_q.contiguous())


# Int8Linear's packed weights: made once per weight_q (and again after it changes in place).
_packed_weights = TensorCache()


@torch.no_grad()
def input_channel_maxima(layers: dict, run: Callable[[], None]) -> dict:
    """``{key: layer}`` -> ``{key: per-input-channel max |x|}`` of what each layer received while
    ``run()`` ran (calibration batches through the model): SmoothQuant's activation statistics."""
    maxima, hooks = {}, []
    for key, layer in layers.items():
        def record(module, inputs, key=key):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            maxima[key] = x if key not in maxima else torch.maximum(maxima[key], x)
        hooks.append(layer.register_forward_pre_hook(record))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def interleave_geglu(t: torch.Tensor) -> torch.Tensor:
    """Rows [a_0..a_{I-1}, b_0..b_{I-1}] -> [a_0, b_0, a_1, b_1, ...] (weights, scales or bias)."""
    half = t.shape[0] // 2
    return torch.stack((t[:half], t[half:]), 1).reshape(t.shape)


class Int8Linear(nn.Module):
    """A W8A8 replacement for nn.Linear: weights quantized once, activations per call.

    ``activation`` fuses gelu / gelu_tanh, or "geglu" (output width halves: gelu(first half) *
    second half, as ModernBERT's MLP). ``smooth`` holds SmoothQuant's per-input-channel 1/s when
    the layer was converted with calibration data.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 smoothed: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features) if smoothed else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, activation: str | None = None, calibration=None, alpha: float = 0.5):
        """Quantize ``linear``. ``calibration``: activations (a tensor or an iterable of tensors
        [..., in_features]) for SmoothQuant smoothing with migration strength ``alpha``."""
        weight = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                    smoothed=calibration is not None)
        if calibration is not None:
            batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
            act_max = torch.stack([b.detach().float().reshape(-1, linear.in_features).abs().amax(0) for b in batches])
            act_max = act_max.amax(0).clamp_min(1e-5)
            weight_max = weight.abs().amax(0).clamp_min(1e-5)
            factor = act_max.pow(alpha) / weight_max.pow(1 - alpha)
            weight = weight * factor
            layer.smooth.copy_(1.0 / factor)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        if activation == "geglu":
            weight = interleave_geglu(weight)
            bias = interleave_geglu(bias) if bias is not None else None
        w_q, w_scale = quantize_per_channel(weight)
        layer.weight_q.copy_(w_q)
        layer.weight_scale.copy_(w_scale)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                out_dtype: torch.dtype | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``norm_weight`` fuses a bias-free LayerNorm of x into the quantization; ``out_dtype`` (default
        x's) is what the epilogue writes, so a consumer in another dtype needs no cast pass; ``residual``
        (the output's shape, in out_dtype) is added in the epilogue."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects {self.in_features} input features, got x of shape {tuple(x.shape)}")
        # The buffers from their dict: Module.__getattr__ costs ~0.4 us a name, felt on short inputs.
        buffers = self._buffers
        weight_q = buffers["weight_q"]
        leading = x.shape[:-1]
        if residual is not None:
            out_features = self.out_features // 2 if self.activation == "geglu" else self.out_features
            if residual.shape != (*leading, out_features):
                raise ValueError(f"residual {tuple(residual.shape)} must have the output's shape "
                                 f"{(*leading, out_features)}")
            residual = residual.reshape(-1, out_features)
        y = int8_linear_dynamic(x.reshape(-1, self.in_features), weight_q, buffers["weight_scale"], buffers["bias"],
                                self.activation, out_dtype, norm_weight=norm_weight, eps=eps, smooth=buffers["smooth"],
                                residual=residual, packed_weight=self._packed_weight(weight_q))
        return y.view(*leading, y.shape[-1])

    def bind(self, x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
             out_dtype: torch.dtype | None = None,
             residual: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """What ``forward(x, norm_weight, eps, out_dtype, residual)`` runs, as ``run(x, residual)`` for
        inputs [M, in_features] of x's dtype and device (and a residual of the output's, where one
        was given here): the operand checks, the backend choice and the packed weight's lookup made
        once. It does not follow later changes to the buffers: bind again after them. Hooks do not
        see its calls; inputs that need a gradient run ``forward``."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Int8Linear.bind takes x [M, {self.in_features}], got shape {tuple(x.shape)}")
        buffers = self._buffers
        weight_q = buffers["weight_q"]
        smooth = buffers["smooth"]
        w_q, w_scale, bias, activation, out_dtype, backend, _, packed_weight = _checked_int8_linear_dynamic(
            x, weight_q, buffers["weight_scale"], buffers["bias"], self.activation, out_dtype, norm_weight, smooth,
            residual, self._packed_weight(weight_q), None)
        dtype, device, in_features = x.dtype, x.device, self.in_features
        out_features = self.out_features // 2 if self.activation == "geglu" else self.out_features

        def run(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
            if x.dim() != 2 or x.shape[1] != in_features or x.dtype != dtype or x.device != device:
                raise ValueError(f"this bound Int8Linear takes {dtype} x [M, {in_features}] on {device}, got "
                                 f"{x.dtype} {tuple(x.shape)} on {x.device}")
            if residual is not None and (residual.shape != (x.shape[0], out_features) or residual.dtype != out_dtype
                                         or residual.device != device):
                raise ValueError(f"residual must be {out_dtype} [{x.shape[0]}, {out_features}] on {device}, got "
                                 f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
            if torch.is_grad_enabled() and x.requires_grad:
                return self.forward(x, norm_weight, eps, out_dtype, residual)
            return backends.run(_int8_linear_dynamic_op, x.contiguous(), norm_weight, eps, smooth, w_q, w_scale, bias,
                                activation, out_dtype, backend, None if residual is None else residual.contiguous(),
                                packed_weight)

        return run

    def native_operands(self, x: torch.Tensor):
        """This linear as the native encoder layer takes it (``encoder_layer.NativeLinear``: w_q,
        w_scale, the packed weight and the smoothing factors, and the bias) for inputs like ``x``, or
        None where the C++ CPU backend does not run its calls."""
        packed = self._packed_weight(self.weight_q)
        if x.device.type != "cpu" or packed is None:
            return None
        smooth = () if self.smooth is None else (self.smooth,)
        return NativeLinear((self.weight_q.contiguous(), self.weight_scale.contiguous(), packed, *smooth), self.bias)

    @staticmethod
    def _packed_weight(weight_q: torch.Tensor) -> torch.Tensor | None:
        """weight_q packed for the C++ CPU backend, where that backend runs this call; made at the
        first such call and again after weight_q changes (in place, or replaced by ``.to()`` /
        ``load_state_dict``). Not under ``torch.compile``, whose graph packs per call."""
        device = weight_q.device
        if device.type != "cpu" or torch.compiler.is_compiling() or INT8_LINEAR.resolve(None, device) != "cpu":
            return None
        return _packed_weights.get(weight_q, ("cpu_packed", weight_q.data_ptr()), lambda: int8_pack_weight(weight_q))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation}, smoothed={self.smooth is not None}")
