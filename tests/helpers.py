"""Shared test helpers: tolerances per dtype and the error measure they apply to."""

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
