#!/usr/bin/env bash
# The GPU run: GPU tests, the cross-compile check and the full benchmark suite, in one command,
# installing nothing (the GPU machines have no network). Writes everything into OUT_DIR.
#
#   benchmarks/gpu_suite.sh OUT_DIR
#
# Runs from a source checkout with PYTHONPATH pointing at it, on the machine's own torch, triton,
# pytest and matplotlib. Budget: under 9 minutes (tests ~3, benchmarks ~5).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$repo"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")' || exit 2
{ nvidia-smi; python3 -m modernbert_kernels.cli info; } > "$out/device.txt" 2>&1
status=0
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/gpu_tests.xml" 2>&1 \
    | tee "$out/gpu_tests.txt" || status=1
timeout 300 python3 -m benchmarks.run --out "$out" 2>&1 | tee "$out/benchmarks.txt" || status=1
exit $status
