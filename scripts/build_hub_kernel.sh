#!/usr/bin/env bash
# Builds the kernel-hub (Hugging Face `kernels` package) form of modernbert-kernels into OUT, one
# variant folder per backend: the CUDA one when a CUDA toolkit is found (FORCE_CUDA=0 skips it),
# and the CPU one always (for CPU-only torch installs, which `kernels` resolves to it):
#   OUT/build/torch-stable-abi211-cu130-x86_64-linux/   OUT/build/torch-stable-abi211-cpu-x86_64-linux/
#     metadata.json   the variant's name, id (= its op namespace), license and backend
#     __init__.py ... the Python package, loaded by `kernels` as the module <id>
#     _ops.py         the op namespace of this build, _modernbert_kernels_<hash>
#     _C.abi3.so      the C++ (and CUDA) extension on the stable ABI, registering that namespace
# The namespace differs from the pip package's (modernbert_kernels), so both load in one process.
#   scripts/build_hub_kernel.sh OUT     # in an environment with torch >= 2.11 (+ nvcc for CUDA)
# Load it: kernels.get_local_kernel(Path(OUT)), or LOCAL_KERNELS="org/repo=OUT" with
# attn_implementation="org/repo:attention_forward" in transformers. Publish: README "Building".
set -euo pipefail
out=${1:?usage: scripts/build_hub_kernel.sh OUT}
cd "$(dirname "$0")/.."

if [[ -z "${FORCE_CUDA:-}" ]] && { command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; }; then
  FORCE_CUDA=1
fi
backends=(cpu)
if [[ "${FORCE_CUDA:-0}" == 1 ]]; then backends=(cuda cpu); fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
# The build's id: a hash of what it is built from (same sources, same namespace, every variant).
hash=$(cat setup.py csrc/*.h csrc/*.cpp csrc/*/* $(find modernbert_kernels -name '*.py' | sort) | sha256sum | cut -c1-10)
namespace="_modernbert_kernels_${hash}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for backend in "${backends[@]}"; do
  variant=$(BACKEND=$backend python - <<'PY'
import os, platform, torch
if os.environ["BACKEND"] == "cuda":
    major, minor = torch.version.cuda.split(".")[:2]
    print(f"torch-stable-abi211-cu{major}{minor}-{platform.machine()}-linux")
else:
    print(f"torch-stable-abi211-cpu-{platform.machine()}-linux")
PY
)
  dest="$out/build/$variant"
  echo "building $variant with op namespace $namespace"
  FORCE_CUDA=$([[ $backend == cuda ]] && echo 1 || echo 0) MODERNBERT_KERNELS_BUILD_EXTENSION=1 \
    MODERNBERT_KERNELS_NAMESPACE=$namespace \
    python setup.py --quiet build_ext --build-lib "$work/$backend/lib" --build-temp "$work/$backend/temp" \
    >"$work/$backend.log" 2>&1 || { tail -n 60 "$work/$backend.log"; exit 1; }

  rm -rf "$dest"
  mkdir -p "$dest"
  cp -r modernbert_kernels/. "$dest/"
  find "$dest" -name __pycache__ -prune -exec rm -rf {} +
  rm -f "$dest"/_C*.so
  cp "$work/$backend"/lib/modernbert_kernels/_C*.so "$dest/"
  sed -i "s/^NAMESPACE = \"modernbert_kernels\"$/NAMESPACE = \"$namespace\"/" "$dest/_ops.py"
  grep -q "^NAMESPACE = \"$namespace\"$" "$dest/_ops.py" || { echo "could not set the namespace in _ops.py"; exit 1; }
  archs='null'
  if [[ $backend == cuda ]]; then  # the archs built, as TORCH_CUDA_ARCH_LIST names them ("+PTX" dropped)
    archs=$(python -c 'import json, os, re; print(json.dumps([a.removesuffix("+PTX") for a in re.split(r"[ ;]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a]))')
  fi
  cat >"$dest/metadata.json" <<JSON
{
  "name": "modernbert-kernels",
  "id": "$namespace",
  "version": 1,
  "license": "Apache-2.0",
  "backend": {"type": "$backend", "archs": $archs},
  "python-depends": []
}
JSON
  echo "wrote $dest"
done
