"""Builds modernbert_kernels._C, the C++ extension (csrc/), next to the pure-Python package.

- CPU kernels always, when torch and a C++ compiler are present at build time.
- CUDA kernels too when FORCE_CUDA=1 or a CUDA device is visible; TORCH_CUDA_ARCH_LIST picks the
  archs (default "8.0;9.0+PTX"), MAX_JOBS the parallel compile jobs (torch's BuildExtension reads both).
- MODERNBERT_KERNELS_BUILD_EXTENSION=0 skips the extension (pure-Python install: the Triton and
  PyTorch backends still work); =1 makes a missing compiler or torch an error instead of a warning.
- MODERNBERT_KERNELS_WERROR=1 turns warnings in our sources into errors (CI sets it).
- The extension is written against PyTorch's stable ABI (torch/csrc/stable) with
  TORCH_TARGET_VERSION = 2.11, and against Python's limited API (abi3): one binary serves every
  torch from 2.11 on and every CPython from 3.10 on. The version's local tag says what it needs:
  +cu13torch2.11 (CUDA 13.x, torch >= 2.11) or +cputorch2.11; a pure-Python build keeps the
  plain version.
- MODERNBERT_KERNELS_NAMESPACE sets the op namespace (default modernbert_kernels; the kernel-hub
  build gives its own, see scripts/build_hub_kernel.sh).

Build with torch >= 2.11 installed: pip install --no-build-isolation ...
"""

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

BASE_VERSION = "0.1.0"
# The oldest torch the binary runs with: the stable-ABI feature level it is compiled for.
TARGET_TORCH = (2, 11)


def _skip(reason: str, required: bool):
    if required:
        sys.exit(f"modernbert-kernels: cannot build the C++ extension: {reason}")
    warnings.warn(f"modernbert-kernels: building without the C++ extension ({reason})", stacklevel=1)
    return BASE_VERSION, [], {}


def _set_cuda_home():
    """Point CUDA_HOME at a toolkit root before torch guesses: torch derives it from the nvcc on
    PATH, which is wrong where that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = root
            return


def _extension():
    mode = os.environ.get("MODERNBERT_KERNELS_BUILD_EXTENSION", "auto")
    if mode == "0":
        return BASE_VERSION, [], {}
    required = mode == "1"
    _set_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip("torch is not installed in the build environment (use --no-build-isolation)", required)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _skip(f"no C++ compiler ({compiler}) on PATH", required)

    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    )
    # sm_80 and sm_90 binaries, plus sm_90 PTX that newer GPUs compile at load time.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    warning_flags = ["-Wall", "-Wextra", "-Wno-unused-parameter"]
    if os.environ.get("MODERNBERT_KERNELS_WERROR") == "1":
        warning_flags.append("-Werror")
    # -march is not set: the AVX-512 / AVX2 kernels are compiled per file (#pragma GCC target)
    # and chosen at run time, so the binary runs on any x86-64. Threads come from torch's own
    # parallel_for through the stable ABI, so no OpenMP here. Hidden visibility: the stable headers'
    # types are hidden, and nothing but PyInit__C needs exporting (ops register at load time).
    cxx_flags = ["-O3", "-ffp-contract=fast", "-fvisibility=hidden", *warning_flags]
    major, minor = TARGET_TORCH
    macros = [("TORCH_TARGET_VERSION", f"0x{major:02x}{minor:02x}000000000000ULL")]
    namespace = os.environ.get("MODERNBERT_KERNELS_NAMESPACE")
    if namespace:
        macros.append(("MODERNBERT_KERNELS_NAMESPACE", namespace))
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    torch_tag = f"torch{major}.{minor}"
    if with_cuda:
        if cpp_extension.CUDA_HOME is None:
            return _skip("FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME)", True)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "-Xcompiler", ",".join(["-fvisibility=hidden", "-Wall", *warning_flags[1:]])]
        if "-Werror" in warning_flags:
            nvcc_flags += ["-Werror", "all-warnings"]
        # USE_CUDA: the stable C shim declares its CUDA stream getter only then.
        extension = cpp_extension.CUDAExtension(
            "modernbert_kernels._C", sources, py_limited_api=True,
            define_macros=[*macros, ("MODERNBERT_KERNELS_WITH_CUDA", "1"), ("USE_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
        # One wheel per CUDA major: the CUDA runtime keeps its ABI within a major version.
        tag = f"cu{(torch.version.cuda or '').split('.')[0]}{torch_tag}"
    else:
        extension = cpp_extension.CppExtension(
            "modernbert_kernels._C", sources, py_limited_api=True, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
        )
        tag = f"cpu{torch_tag}"
    return f"{BASE_VERSION}+{tag}", [extension], {"build_ext": cpp_extension.BuildExtension}


version, ext_modules, cmdclass = _extension()
# abi3: the module uses only Python's limited API, so the wheel is tagged cp310-abi3.
options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}
setup(version=version, ext_modules=ext_modules, cmdclass=cmdclass, options=options)
