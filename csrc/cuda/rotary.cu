// Rotary position embedding: one thread per pair (token, group, i), a grid-stride loop over all
// pairs. Each thread reads its two elements before writing them, so out may alias x.
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace modernbert_kernels::cuda {
namespace {

constexpr int kRotaryThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRotaryThreads) rotary_kernel(RotaryParams a) {
  const int64_t half = a.head_dim / 2;
  const int64_t pairs = a.tokens * a.groups * half;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < pairs; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = p % half, row = p / half;
    const int64_t g = row % a.groups, t = row / a.groups;
    const T* x = static_cast<const T*>(a.x) + t * a.x_stride[0] + g * a.x_stride[1];
    T* out = static_cast<T*>(a.out) + t * a.out_stride[0] + g * a.out_stride[1];
    const float c = a.cos[t * half + i], s = a.sin[t * half + i];
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    out[i] = from_float<T>(x1 * c - x2 * s);
    out[i + half] = from_float<T>(x2 * c + x1 * s);
  }
}

}  // namespace

cudaError_t launch_rotary(const RotaryParams& args, cudaStream_t stream) {
  const int64_t pairs = args.tokens * args.groups * (args.head_dim / 2);
  if (pairs == 0) return cudaSuccess;
  // Enough blocks to fill any current GPU; the loop covers the rest.
  const int64_t blocks = std::min<int64_t>((pairs + kRotaryThreads - 1) / kRotaryThreads, 65536);
  return dispatch_element_type(args.dtype, [&](auto* typed) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(typed)>;
    rotary_kernel<T><<<static_cast<unsigned>(blocks), kRotaryThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace modernbert_kernels::cuda
