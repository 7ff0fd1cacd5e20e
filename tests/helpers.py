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
