"""The C++/CUDA extension (csrc/, built as ``modernbert_kernels._C``): whether it loaded, and why not.

Importing ``_C`` registers the native kernels as ``torch.ops.modernbert_kernels.*_native`` (the
namespace of _ops.py); the public ops call them for ``backend="cpu"`` and ``backend="cuda"``. A pure-Python install (no
compiler at build time, or MODERNBERT_KERNELS_BUILD_EXTENSION=0) works without them. The answers
are computed once at import, so torch.compile sees constants.
"""

from __future__ import annotations

import torch

from ._ops import add_op_namespace_prefix, ops


def _load() -> tuple[tuple[bool, str], str | None]:
    """(the CPU status, the CPU kernel build chosen at run time: amx, avx512_bf16, avx512, avx2 or
    baseline; None without the extension)."""
    try:
        from . import _C  # noqa: F401
    except ImportError as err:
        return (False, f"the C++ extension is not built ({err}); reinstall with a compiler and torch present"), None
    isa = ops.cpu_isa()
    return (True, f"C++ kernels ({isa} build)"), isa


_CPU_STATUS, CPU_ISA = _load()
_CUDA_BUILT = _CPU_STATUS[0] and torch._C._dispatch_has_kernel_for_dispatch_key(
    add_op_namespace_prefix("int8_linear_native"), "CUDA"
)


def cpu_status() -> tuple[bool, str]:
    """(the native CPU kernels are usable, why / why not)."""
    return _CPU_STATUS


def cuda_status() -> tuple[bool, str]:
    """(the native CUDA kernels are usable, why / why not)."""
    if not _CPU_STATUS[0]:
        return _CPU_STATUS
    if not _CUDA_BUILT:
        return False, "the extension was built without CUDA kernels (rebuild with FORCE_CUDA=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "CUDA C++ kernels"


def status(device_type: str) -> tuple[bool, str]:
    return cuda_status() if device_type == "cuda" else cpu_status()
