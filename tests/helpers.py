"""Shared test helpers: tolerances per dtype and the error measure they apply to, the backends the
CPU tests run, and the matrix of cases each backend gets."""

import itertools

import pytest
import torch

from modernbert_kernels import native

# Relative error (max |out - ref| / max |ref|) allowed against the float64 reference, per dtype.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# Backends the CPU tests run: Triton's kernels in its interpreter, the C++ kernels, and the PyTorch
# path. On a GPU machine (no TRITON_INTERPRET) the interpreter tests are skipped; the gpu tests
# cover Triton there. The C++ backend is skipped (with the reason) when the extension is not built.
CPU_BACKENDS = [
    pytest.param("triton", marks=pytest.mark.interpreter),
    pytest.param("cpu", marks=pytest.mark.skipif(not native.cpu_status()[0], reason=native.cpu_status()[1])),
    "torch",
]

# The CPU backends outside Triton's interpreter: the C++ kernels and the PyTorch path.
NATIVE_CPU_BACKENDS = [b for b in CPU_BACKENDS if getattr(b, "values", (b,))[0] != "triton"]

# The C++ CPU kernels, where the extension is built.
CPU_EXTENSION = pytest.mark.skipif(not native.cpu_status()[0], reason=native.cpu_status()[1])
# Backends the GPU tests run (marked gpu: skipped without a CUDA device): Triton's kernels, and the
# C++ extension's CUDA kernels when it was built with them (FORCE_CUDA=1).
GPU_BACKENDS = [
    "triton",
    pytest.param("cuda", marks=pytest.mark.skipif(not native.cuda_status()[0], reason=native.cuda_status()[1])),
]
CUDA_EXTENSION = pytest.mark.skipif(not native.cuda_status()[0], reason=native.cuda_status()[1])
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_qkv(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]



def pairwise(factors: dict) -> list[dict]:
    """A covering array of strength 2 over ``factors`` ({name: values}): every value of every
    factor, and every pair of values of any two factors, appears in at least one returned case.
    Greedy (each step takes the case covering the most uncovered pairs), so deterministic.

    For Triton's interpreter, which runs a kernel about a thousand times slower than the C++ path:
    a bug that needs one factor's value meeting another's (a window on varlen batches, fp16 on one
    layout) still has a case that shows it, at a quarter or less of the cross product's cases."""
    names = list(factors)
    if len(names) < 2:  # no pairs to cover: each value once
        return [{name: value} for name in names for value in factors[name]] or [{}]

    def pairs(case):
        return {(a, case[a], b, case[b]) for a, b in itertools.combinations(range(len(case)), 2)}

    candidates = list(itertools.product(*(range(len(values)) for values in factors.values())))
    uncovered = set().union(*(pairs(case) for case in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda case: len(pairs(case) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return [{name: factors[name][index] for name, index in zip(names, case)} for case in chosen]


def each_value(factors: dict) -> list[dict]:
    """Every value of every factor in at least one case: as many cases as the longest factor has
    values (case i takes value i modulo each factor's count)."""
    longest = max((len(values) for values in factors.values()), default=1)
    return [{name: values[i % len(values)] for name, values in factors.items()} for i in range(longest)]


def backend_matrix(factors: dict, ids: dict | None = None, triton_strength: int = 2) -> list:
    """pytest params ("backend", *factors) for the CPU test matrix: the full cross product of
    ``factors`` on the C++ and PyTorch backends (milliseconds a case), and for Triton in its
    interpreter a covering of it: every pair of values (``pairwise``), or with ``triton_strength=1``
    every value once (``each_value``: for features built on the kernels without changing them,
    whose kernel paths other matrices already cover). ``ids`` maps a factor to a function naming
    its values in test ids."""
    ids = ids or {}
    full = [dict(zip(factors, values)) for values in itertools.product(*factors.values())]
    covering = {1: each_value, 2: pairwise}[triton_strength]
    params = []
    for backend in CPU_BACKENDS:
        name, marks = (backend.values[0], backend.marks) if hasattr(backend, "values") else (backend, ())
        for case in covering(factors) if name == "triton" else full:
            case_id = "-".join([name] + [ids.get(f, str)(value) for f, value in case.items()])
            params.append(pytest.param(name, *case.values(), marks=marks, id=case_id))
    return params
