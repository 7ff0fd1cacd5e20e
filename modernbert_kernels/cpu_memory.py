"""Freed CPU memory kept for the next call instead of handed back to the OS.

PyTorch's CPU allocator is glibc's malloc. glibc serves a request of 32 MiB or more (an encoder's
[tokens, 2304] activations at 4096 tokens are 38 MB) with a fresh mmap and unmaps it when freed, so
every call page-faults its large activations in again: oneDNN's fp32 GEMM at 4096 x 768 -> 2304
runs at 187 GFLOP/s into a fresh output and 220 into a reused one (AMD EPYC Zen 4,
benchmarks/NOTES.md). Runtimes avoid this with their own arenas (ONNX Runtime's, OpenVINO's).

Here glibc's heap keeps a pad of free memory at its top (``mallopt(M_TOP_PAD)``), grown into place
at once: requests are cut from it when it is large enough, and a trim keeps the pad, so the pages
stay resident between calls. The encoder sets it at its first CPU call;
MODERNBERT_KERNELS_CPU_HEAP_PAD (bytes, 0 for glibc's default) overrides the size. Only glibc
(Linux) has it; elsewhere nothing changes.

It is a heuristic, not an arena: a freed block comes back only if it rejoined the top or fits a
later request exactly. A small allocation that outlives it and sits just after it (say, a
result kept from each call) pins it, and the next request is cut from fresh pad pages: a loop of
40 MB tensors that keeps one 1.2 KB tensor per round faulted every round in (AMD EPYC Zen 4).
The encoder's own calls settle to ~0 faults, whether or not the caller keeps outputs
(benchmarks/NOTES.md). A real arena would replace torch's CPU allocator, which the stable ABI the
extension is built on does not expose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

DEFAULT_PAD_BYTES = 1 << 30
# glibc's mallopt parameter numbers, and the largest mmap threshold it accepts on 64-bit (the top of
# its dynamic range): with it fixed there, every request under 32 MiB comes from the heap, whose
# first growth then takes the pad, and larger ones are cut from the pad when it has room.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20

_pad_in_effect: int | None = None  # bytes, once set in this process (None: not set by us)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError, TypeError):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _MallInfo2
    return libc


def configured_pad_bytes() -> int:
    """MODERNBERT_KERNELS_CPU_HEAP_PAD in bytes, or the default (1 GiB) when it is not set."""
    setting = os.environ.get("MODERNBERT_KERNELS_CPU_HEAP_PAD", str(DEFAULT_PAD_BYTES))
    try:
        return int(setting)
    except ValueError:
        raise ValueError(f"MODERNBERT_KERNELS_CPU_HEAP_PAD must be a number of bytes, got {setting!r}") from None


def keep_freed_memory(pad_bytes: int | None = None) -> int | None:
    """Keep ``pad_bytes`` (default: MODERNBERT_KERNELS_CPU_HEAP_PAD, else 1 GiB) of freed memory at
    the top of glibc's heap. The first call in a process decides; later calls return what it set.
    Returns the pad in effect, or None where the C library is not glibc."""
    global _pad_in_effect
    if _pad_in_effect is not None:
        return _pad_in_effect
    libc = _glibc()
    if libc is None:
        return None
    if pad_bytes is None:
        pad_bytes = configured_pad_bytes()
    if pad_bytes < 0:
        raise ValueError(f"the heap pad must be >= 0 bytes, got {pad_bytes}")
    if pad_bytes > 0:
        top_pad = min(pad_bytes, 2**31 - 1)  # mallopt takes an int
        if not libc.mallopt(_M_TOP_PAD, ctypes.c_int(top_pad)):
            return None
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX))
        _grow_the_heap_by(libc, top_pad)
    _pad_in_effect = pad_bytes
    return _pad_in_effect


def heap_top_bytes() -> int | None:
    """Free bytes at the top of glibc's main heap (mallinfo2's keepcost), or None without glibc 2.33+."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return libc.mallinfo2().keepcost


def _grow_the_heap_by(libc, top_pad: int) -> None:
    """glibc adds the pad at the heap's next growth, and until one happens a first request of 32 MiB
    or more is still mmapped. Blocks just under the mmap threshold, cut from the top until the heap
    grows, then freed, put the pad in place now; nothing is written, so no page is touched."""
    block = _MMAP_THRESHOLD_MAX - (1 << 20)
    blocks = []
    for _ in range(top_pad // block + 2):
        top = heap_top_bytes()
        if top is None or top >= top_pad:
            break
        pointer = libc.malloc(block)
        if not pointer:
            break
        blocks.append(pointer)
    for pointer in blocks:
        libc.free(pointer)


def return_freed_memory_to_the_os(threshold_bytes: int = 64 << 10) -> None:
    """The opposite, for measuring memory (benchmarks.timing.peak_memory): no heap pad, and every
    freed block of ``threshold_bytes`` or more handed back to the OS (a fixed mmap and trim
    threshold; by default the mmap threshold rises up to 32 MiB after a large free, and the freed
    memory stays resident), so the resident set does not remember earlier, larger calls."""
    keep_freed_memory(0)
    libc = _glibc()
    if libc is None:
        raise RuntimeError("returning freed memory to the OS needs glibc's mallopt")
    libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes))
    libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(threshold_bytes))


def glibc_available() -> bool:
    return _glibc() is not None


def pad_in_effect() -> int | None:
    """The heap pad this process runs with, if keep_freed_memory set one."""
    return _pad_in_effect
