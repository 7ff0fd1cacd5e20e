"""CPU micro-benchmarks for pytest-benchmark, so regressions show in its comparison tables.

    pytest benchmarks/ --benchmark-only                    # run
    pytest benchmarks/ --benchmark-only --benchmark-autosave --benchmark-compare   # against the last run
"""

import pytest
import torch

from modernbert_kernels import Int8Linear, block_sparse_attention, layouts, native

BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not native.cpu_status()[0], reason=native.cpu_status()[1])),
            "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_len", [2048, 8192])
def test_sliding_window_attention(benchmark, seq_len, backend):
    layout = layouts.sliding_window(seq_len, 64, 64)
    q, k, v = (torch.randn(1, 12, seq_len, 64) for _ in range(3))
    with torch.no_grad():
        benchmark(block_sparse_attention, q, k, v, layout, window=64, backend=backend)


@pytest.mark.parametrize("activation", [None, "geglu"])
def test_int8_linear_modernbert_base(benchmark, activation):
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(768, 2304), activation=activation)
    x = torch.randn(8192, 768)
    with torch.no_grad():
        benchmark(layer, x)
