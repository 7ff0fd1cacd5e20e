"""`modernbert-kernels info | check`.

The package imports nothing from the encoder (``modernbert``) or the benchmark suite: fine-tuning
has its own entry point (``modernbert-finetune``) and the suite runs from a checkout
(``python -m benchmarks.run``, see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import backends, cpu_memory, native


def backend_table() -> list[tuple[str, str, bool, str]]:
    """(op, backend, live, what it runs [why live or not]) for every backend of every op."""
    from . import attention, int8, rotary  # noqa: F401  (importing an op module registers its backends)

    return backends.table()


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
        print(f"default backend on {device}: {backends.default_backend(torch.device(device))}")
    from .int8 import cpu_int8_gemm

    what = {"amx": "this library's AMX-INT8 tile kernel, on a weight packed once",
            "int8": "oneDNN's int8 GEMM",
            "int16": "the int8 values as int16 pairs through pmaddwd, exact: oneDNN's int8 GEMM is exact and fast "
                     "only with VNNI / AMX",
            "float": "exact fp32 GEMMs of the int8 values, K in parts of at most 1040"}
    for backend in ("cpu", "torch") if native.cpu_status()[0] else ("torch",):
        gemm = cpu_int8_gemm(backend)
        print(f"CPU int8 GEMM, backend={backend}: {gemm} ({what[gemm]})")
    from .cpu_linear import GEMMS, encoder_gemms

    print(f"CPU heap pad the encoder keeps (MODERNBERT_KERNELS_CPU_HEAP_PAD): {cpu_memory.configured_pad_bytes()} bytes"
          + ("" if cpu_memory.glibc_available() else " (not glibc: not applied)"))
    print(f"CPU GEMM of each linear of ModernBERT-base (the fastest of {' / '.join(GEMMS)}, measured here):")
    # Measured as the encoder measures them, with its heap pad in place: without it, a GEMM whose
    # output is faulted in again on some calls and not others can lose to a slower one by chance.
    cpu_memory.keep_freed_memory()
    for precision, (in_features, out_features), chosen in encoder_gemms():
        by_tokens = ", ".join(f"{tokens} token{'s' * (tokens > 1)}: {gemm}" for tokens, gemm in chosen.items())
        print(f"  {precision} {in_features:5d} -> {out_features:5d}: {by_tokens}")
    print()
    print(f"{'op':24s} {'backend':10s} {'live':5s} what")
    for op, backend, live, what in backend_table():
        print(f"{op:24s} {backend:10s} {'yes' if live else 'no':5s} {what}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="modernbert-kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and which backends are live")
    sub.add_parser("check", help="cross-compile every Triton kernel for sm_80 and sm_90", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    from .check import main as check_main

    return check_main(rest)


if __name__ == "__main__":
    sys.exit(main())
