"""Shared test helpers: tolerances per dtype and the error measure they apply to."""

import torch

# Relative error (max |out - ref| / max |ref|) allowed against the float64 reference, per dtype.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
