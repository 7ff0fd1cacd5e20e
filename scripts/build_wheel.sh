#!/usr/bin/env bash
# Builds a wheel of modernbert-kernels with the C++ extension for the torch (and CUDA toolkit) of
# the active environment (torch >= 2.11), into dist/. Its local tag names what it needs, e.g.
#   modernbert_kernels-0.1.0+cu13torch2.11-cp310-abi3-linux_x86_64.whl  (CUDA 13, any torch >= 2.11)
# CUDA kernels are built when nvcc is found (FORCE_CUDA=0 turns them off); TORCH_CUDA_ARCH_LIST
# picks the archs (default "8.0;9.0+PTX"); MAX_JOBS caps parallel compile jobs.
#   scripts/build_wheel.sh            # needs torch, setuptools, wheel (and ninja, optional) installed
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${FORCE_CUDA:-}" ]] && { command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; }; then
  export FORCE_CUDA=1
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export MODERNBERT_KERNELS_BUILD_EXTENSION=1  # a wheel without the extension is not what was asked for

# --no-build-isolation: the extension must be compiled against the torch it will run with.
python -m pip wheel --no-build-isolation --no-deps --wheel-dir dist .
ls -1 dist/*.whl
