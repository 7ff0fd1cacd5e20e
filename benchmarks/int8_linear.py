"""Int8Linear (W8A8, fused epilogue) vs float linear layers at ModernBERT-base shapes.

CPU: vs fp32 nn.Linear (+ activation) and vs torch.ao dynamic quantization of the same layer;
"int8" is the default backend (the C++ kernels when built), "int8_torch_path" the PyTorch one.
GPU: vs bf16 F.linear (+ activation) and vs torch._int_mm with an unfused epilogue.
Also reports each int8 layer's relative error against the float layer, with and without
SmoothQuant smoothing, on activations with a few outlier channels.

    python -m benchmarks.int8_linear --device cpu
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from benchmarks.report import result_rows
from benchmarks.timing import summarize, time_fn
from modernbert_kernels import Int8Linear, int8_linear, quantize_per_token

# (name, in_features, out_features, activation) of ModernBERT-base's linear layers.
LAYERS = [
    ("Wqkv", 768, 2304, None),
    ("Wi+GeGLU", 768, 2 * 1152, "geglu"),
    ("mlp.Wo", 1152, 768, None),
    ("attn.Wo", 768, 768, None),
]


def float_reference(linear: torch.nn.Linear, activation):
    def run(x):
        y = linear(x)
        if activation == "geglu":
            a, b = y.chunk(2, -1)
            return F.gelu(a) * b
        return F.gelu(y) if activation == "gelu" else y

    return run


def realistic_activations(tokens: int, features: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """Normal activations with a few outlier channels 10x larger, as LLM/encoder activations have."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, features, device=device, generator=generator)
    x[:, torch.randperm(features, generator=torch.Generator().manual_seed(seed))[:8].to(device)] *= 10
    return x.to(dtype)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def run(device: torch.device, quick: bool, progress=None, headline: bool = False, smoke: bool = False) -> list[dict]:
    """``headline``: the GPU suite's stage b, the MLP's two layers at 8192 tokens."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    token_counts = [1024] if smoke else [8192] if headline else [4096, 65536] if device.type == "cuda" else [8192]
    layers = LAYERS[1:3] if headline else LAYERS[1:2] if quick else LAYERS
    rows = []
    for tokens in token_counts:
        for name, k, n, activation in layers:
            torch.manual_seed(0)
            linear = torch.nn.Linear(k, n, device=device, dtype=dtype)
            x = realistic_activations(tokens, k, device, dtype)
            expected = float_reference(linear, activation)
            calibration = realistic_activations(512, k, device, dtype, seed=1)
            int8_layer = Int8Linear.from_float(linear, activation=activation)
            smoothed_layer = Int8Linear.from_float(linear, activation=activation, calibration=calibration)
            with torch.no_grad():
                reference_out = expected(x)
                errors = {"int8": relative_error(int8_layer(x), reference_out),
                          "int8_smoothquant": relative_error(smoothed_layer(x), reference_out)}
            baseline = "fp32_linear" if device.type == "cpu" else "bf16_linear"
            providers = {baseline: lambda: expected(x), "int8": lambda: int8_layer(x),
                         "int8_smoothquant": lambda: smoothed_layer(x)}
            if device.type == "cuda":  # the unfused baseline: torch._int_mm, then the epilogue in PyTorch
                from modernbert_kernels.int8 import _epilogue_torch

                def int_mm_unfused(layer=int8_layer):
                    x_q, x_scale = quantize_per_token(x)
                    acc = torch._int_mm(x_q, layer.weight_q.t())
                    return _epilogue_torch(acc, x_scale, layer.weight_scale, layer.bias, layer.activation, x.dtype)

                providers["int_mm_unfused_epilogue"] = int_mm_unfused
            if device.type == "cpu":
                def int8_torch_path(layer=int8_layer):
                    x_q, x_scale = quantize_per_token(x, backend="torch")
                    return int8_linear(x_q, x_scale, layer.weight_q, layer.weight_scale, layer.bias, layer.activation,
                                       x.dtype, backend="torch")

                providers["int8_torch_path"] = int8_torch_path
                with warnings.catch_warnings():  # torch.ao.quantization is deprecated; it is the baseline asked for
                    warnings.simplefilter("ignore")
                    dynamic = torch.ao.quantization.quantize_dynamic(
                        torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
                    )
                providers["torch_ao_dynamic_int8"] = lambda: float_reference(dynamic[0], activation)(x)
            measured = {}
            with torch.no_grad():
                for provider, fn in providers.items():
                    measured[provider] = summarize(time_fn(fn, device, smoke=smoke))
                    if progress:
                        progress(f"int8_linear {name} M={tokens} {provider}: {measured[provider]['median_ms']:.2f} ms")
            flops = 2.0 * tokens * k * n
            # Compulsory traffic of the int8 layer: float activations in, int8 weights, output out.
            moved = tokens * k * x.element_size() + n * k + tokens * (n // 2 if activation == "geglu" else n) * x.element_size()
            rows += result_rows(
                "int8_linear", name, measured, baseline, flops=flops, bytes_moved=moved, seq_len=tokens, M=tokens,
                K=k, N=n, activation=activation or "none",
                per_provider=lambda provider: {"relative_error_vs_float": errors.get(provider, 0.0)},
            )
    return rows


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "int8_linear", argv)


if __name__ == "__main__":
    main()
