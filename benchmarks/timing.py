"""Timers shared by the benchmark scripts: median and spread of repeated runs."""

from __future__ import annotations

import statistics
import time
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


def time_fn(fn: Callable[[], object], device: torch.device, *, repeats: int = 5) -> list[float]:
    return time_gpu(fn) if device.type == "cuda" else time_cpu(fn, repeats=repeats)


def summarize(samples: list[float]) -> dict:
    ordered = sorted(samples)
    q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    return {"median_ms": statistics.median(samples), "iqr_ms": q3 - q1, "min_ms": ordered[0], "runs": len(samples)}
