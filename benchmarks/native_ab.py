"""Two builds of the C++ kernels in one process, interleaved, median of 21 calls each (issue #24):
the package on PYTHONPATH (an older checkout, built in place) against a kernel-hub build of this
checkout (scripts/build_hub_kernel.sh HUB), which registers its own op namespace so both load:

    cd OLD_CHECKOUT && PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python /path/to/benchmarks/native_ab.py HUB
"""
import statistics
import sys
import time
from pathlib import Path

import kernels
import torch

import modernbert_kernels as old

new = kernels.get_local_kernel(Path(sys.argv[1]))
assert new.__name__ != old.__name__, "the hub build must be a different copy than the package on PYTHONPATH"
torch.manual_seed(0)

def attention_case(pkg, n, backward):
    q, k, v = (torch.randn(1, 12, n, 64, requires_grad=backward) for _ in range(3))
    layout = pkg.layouts.sliding_window(n, 256, 64)
    def run():
        out = pkg.block_sparse_attention(q, k, v, layout, window=256, backend="cpu")
        if backward:
            out.sum().backward()
    return run

def int8_case(pkg, m):
    x = torch.randn(m, 768)
    w_q, w_s = old.quantize_per_channel(torch.randn(2304, 768))
    def run():
        x_q, x_s = pkg.quantize_per_token(x, backend="cpu")
        pkg.int8_linear(x_q, x_s, w_q, w_s, activation="geglu", backend="cpu", out_dtype=torch.float32)
    return run

def rotary_case(pkg, n):
    x = torch.randn(n, 24, 64)
    cos, sin = torch.randn(n, 32), torch.randn(n, 32)
    return lambda: pkg.rotary_embedding(x, cos, sin, backend="cpu")

cases = {
    "attention fwd, 8192 tokens, window 256": lambda p: attention_case(p, 8192, False),
    "attention fwd+bwd, 4096 tokens, window 256": lambda p: attention_case(p, 4096, True),
    "int8 linear + GeGLU (with quantize), 8192 x 768 -> 2304": lambda p: int8_case(p, 8192),
    "int8 linear + GeGLU (with quantize), 512 x 768 -> 2304": lambda p: int8_case(p, 512),
    "rotary, 8192 tokens x 24 heads": lambda p: rotary_case(p, 8192),
}
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print("| op | old (at::) ms | new (stable ABI) ms | new / old |\n|---|---|---|---|")
for name, make in cases.items():
    runs = {"old": make(old), "new": make(new)}
    for r in runs.values():
        r(); r()
    times = {"old": [], "new": []}
    for i in range(21):
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
            t = time.perf_counter(); runs[side](); times[side].append((time.perf_counter() - t) * 1e3)
    o, n = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"| {name} | {o:.2f} | {n:.2f} | {n / o:.3f} |", flush=True)
