#!/usr/bin/env bash
# The GPU run in budgeted stages (benchmarks/gpu_suite.py), installing nothing: the GPU machines
# have no network, so it runs this checkout through PYTHONPATH on the machine's own packages.
#
#   benchmarks/gpu_suite.sh OUT_DIR     # the run: each stage writes into OUT_DIR as it ends
#   benchmarks/gpu_suite.sh --plan      # the stages, their compiles and budgets (no GPU needed)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ "${1:-}" != "--plan" ]]; then
  unset TRITON_INTERPRET
fi
cd "$repo"
exec python3 -m benchmarks.gpu_suite "$@"
