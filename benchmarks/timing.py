"""Timers shared by the benchmark scripts: median and spread of repeated runs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
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
