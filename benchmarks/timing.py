"""Timers shared by the benchmark scripts: median and spread of repeated runs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def time_cpu(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5, budget_s: float = 2.0) -> list[float]:
    """Wall-clock milliseconds of at least ``repeats`` calls after ``warmup`` calls.

    Fast functions get more runs, up to ``budget_s`` of timing (at most 50), because allocator and
    frequency noise on a 2-core machine is a few milliseconds.
    """
    for _ in range(warmup):
        fn()
    samples = []
    while len(samples) < repeats or (sum(samples) < budget_s * 1e3 and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_gpu(fn: Callable[[], object], *, budget_ms: int = 100) -> list[float]:
    """Milliseconds per call from CUDA events over about ``budget_ms``, L2 flushed between calls."""
    import triton.testing

    return list(triton.testing.do_bench(fn, warmup=25, rep=budget_ms, return_mode="all"))


def time_fn(fn: Callable[[], object], device: torch.device, *, repeats: int = 5, smoke: bool = False) -> list[float]:
    """``smoke``: one call after one warm-up, to check that a script runs (its numbers are not kept)."""
    if smoke:
        return time_gpu(fn, budget_ms=5) if device.type == "cuda" else time_cpu(fn, warmup=1, repeats=1, budget_s=0)
    return time_gpu(fn) if device.type == "cuda" else time_cpu(fn, repeats=repeats)


def summarize(samples: list[float]) -> dict:
    ordered = sorted(samples)
    q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    return {"median_ms": statistics.median(samples), "iqr_ms": q3 - q1, "min_ms": ordered[0], "runs": len(samples)}


def device_ceilings(device: torch.device) -> dict:
    """Measured once per run: a large dense matmul (fp32 on CPU, bf16 on GPU) and a copy.

    Rows report their FLOP rate as a share of this matmul rate, so each result also reads as a
    fraction of what the device does on the easiest possible work.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_ms = summarize(time_fn(lambda: torch.matmul(a, b), device))["median_ms"]
    elements = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(elements, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = summarize(time_fn(lambda: dst.copy_(src), device))["median_ms"]
    return {
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "copy_gb_per_s": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9,  # bytes read + written
    }


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Run ``fn`` once; the memory it needed on top of what was held before it.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (Linux VmHWM, reset
    through /proc/self/clear_refs before the call), so it counts every allocation of the call,
    the C++ kernels' workspaces included, not only tensors; call
    modernbert_kernels.cpu_memory.return_freed_memory_to_the_os() first, in a process that has not
    run larger work.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set to the current one
        before = _proc_status_kib("VmRSS") * 1024
        fn()
        peak = _proc_status_kib("VmHWM") * 1024
    return {"held_before_bytes": before, "peak_bytes": peak, "call_peak_bytes": peak - before}
