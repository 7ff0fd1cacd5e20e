"""`modernbert-kernels info | check | bench`."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def backend_table() -> list[tuple[str, str, bool, str]]:
    """(op, backend, live, why) for every backend of every op."""
    from . import native
    from .attention import triton_status

    triton_live, triton_why = triton_status()
    cpu_live, cpu_why = native.cpu_status()
    cuda_live, cuda_why = native.cuda_status()
    int_mm = hasattr(torch, "_int_mm")
    return [
        ("block_sparse_attention", "triton", triton_live, triton_why),
        ("block_sparse_attention", "cpu", cpu_live, cpu_why + ("; backward: the torch path" if cpu_live else "")),
        ("block_sparse_attention", "cuda", cuda_live, cuda_why),
        ("block_sparse_attention", "torch", True, "visited tiles in PyTorch (dense layouts: fused SDPA): any device"),
        ("block_sparse_attention", "reference", True, "dense masked attention: the test oracle"),
        ("int8_linear", "triton", triton_live, triton_why),
        ("int8_linear", "cpu", cpu_live, cpu_why),
        ("int8_linear", "cuda", cuda_live, cuda_why),
        ("int8_linear", "torch", int_mm, "torch._int_mm + PyTorch epilogue" if int_mm else "torch has no _int_mm"),
        ("quantize_per_token", "triton", triton_live, triton_why),
        ("quantize_per_token", "cpu", cpu_live, cpu_why),
        ("quantize_per_token", "cuda", cuda_live, cuda_why),
        ("quantize_per_token", "torch", True, "PyTorch ops: any device"),
    ]


def info() -> int:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"modernbert-kernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}; CPU threads: {torch.get_num_threads()}")
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        from .attention import default_backend

        print(f"default backend on {device}: {default_backend(torch.device(device))}")
    print()
    print(f"{'op':24s} {'backend':10s} {'live':5s} why")
    for op, backend, live, why in backend_table():
        print(f"{op:24s} {backend:10s} {'yes' if live else 'no':5s} {why}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="modernbert-kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and which backends are live")
    sub.add_parser("check", help="cross-compile every Triton kernel for sm_80 and sm_90", add_help=False)
    sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks.run)", add_help=False)
    sub.add_parser("finetune", help="fine-tune a ModernBERT classifier (python -m modernbert.train)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "finetune":
        from modernbert.train import main as finetune_main

        return finetune_main(rest)
    if args.command == "check":
        from .check import main as check_main

        return check_main(rest)
    try:
        from benchmarks.run import main as bench_main
    except ImportError:
        print("the benchmark suite lives in the source tree: run this from a checkout", file=sys.stderr)
        return 2
    bench_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
