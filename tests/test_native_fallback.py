"""Without the C++ extension (a pure-Python install) the package still works: the reason is
reported, CPU calls pick the PyTorch path, and asking for backend="cpu" is a clear error."""

import subprocess
import sys

CODE = """
import sys
sys.modules["modernbert_kernels._C"] = None  # as if the extension had not been built
import torch
from modernbert_kernels import block_sparse_attention, int8_linear, layouts, native, quantize_per_token
from modernbert_kernels.backends import default_backend
live, why = native.cpu_status()
assert not live and "not built" in why, why
assert default_backend(torch.device("cpu")) == "torch"
q, k, v = (torch.randn(1, 2, 128, 64) for _ in range(3))
out = block_sparse_attention(q, k, v, layouts.sliding_window(128, 32, 32), window=32)
assert out.shape == q.shape and not out.isnan().any()
x_q, x_scale = quantize_per_token(torch.randn(20, 64))
y = int8_linear(x_q, x_scale, x_q[:16], x_scale[:16], out_dtype=torch.float32)
assert y.shape == (20, 16)
try:
    block_sparse_attention(q, k, v, layouts.sliding_window(128, 32, 32), backend="cpu")
except ValueError as err:
    assert "not available" in str(err), err
else:
    raise AssertionError("backend='cpu' without the extension must fail")
print("ok")
"""


def test_pure_python_install_falls_back_cleanly():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
