// W8A8 int8 linear in CUDA (the fallback where Triton is unavailable): int8 tensor cores through
// WMMA (16x16x16 s8 -> s32, sm_72+), a 64x64 output tile per block of four warps (each warp
// 32x32 = 2x2 fragments), K staged through shared memory 32 at a time. The epilogue applies both
// scales, bias, GELU / GeGLU and a residual on the int32 tile in shared memory and writes the output
// once.
// Also the per-token quantization (optionally fused with a bias-free LayerNorm and smoothing).
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace modernbert_kernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTileM = 64, kTileN = 64, kTileK = 32;
constexpr int kThreads = 128;
constexpr int kSlices = kTileK / 16;  // staged as kSlices planes of [rows][16]: each WMMA operand
                                      // then starts 256-bit aligned, as load_matrix_sync requires
constexpr int kAccStride = kTileN + 4;

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

// Loads a [64 rows][32] int8 tile starting at (row0, k0) of a row-major [rows, k] matrix into
// dst[slice][row][16]; rows or columns outside the matrix are zero. One 16-byte load per row and
// slice (k is a multiple of 16 and the storage 16-byte aligned, checked by the caller).
__device__ __forceinline__ void stage_tile(int8_t (*dst)[kTileM][16], const int8_t* src, int64_t rows, int64_t k,
                                           int64_t row0, int64_t k0) {
  for (int idx = threadIdx.x; idx < kTileM * kSlices; idx += kThreads) {
    const int r = idx / kSlices, slice = idx % kSlices;
    const int64_t row = row0 + r, col = k0 + 16 * slice;
    int4 value = make_int4(0, 0, 0, 0);
    if (row < rows && col + 16 <= k) value = *reinterpret_cast<const int4*>(src + row * k + col);
    *reinterpret_cast<int4*>(&dst[slice][r][0]) = value;
  }
}

template <typename Out>
__global__ void __launch_bounds__(kThreads) int8_linear_kernel(Int8LinearParams a) {
  __shared__ __align__(32) int8_t x_s[kSlices][kTileM][16];
  __shared__ __align__(32) int8_t w_s[kSlices][kTileN][16];
  __shared__ __align__(32) int acc_s[kTileM][kAccStride];
  const int64_t m0 = int64_t(blockIdx.y) * kTileM, n0 = int64_t(blockIdx.x) * kTileN;
  const int warp = threadIdx.x / 32;
  const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0);
  // K is a multiple of 16 (checked by the caller); a last half-stage is zero-filled.
  for (int64_t k0 = 0; k0 < a.k; k0 += kTileK) {
    __syncthreads();
    stage_tile(x_s, a.x_q, a.m, a.k, m0, k0);
    stage_tile(w_s, a.w_q, a.n, a.k, n0, k0);
    __syncthreads();
    for (int slice = 0; slice < kSlices; ++slice) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> x_frag[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> w_frag[2];
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(x_frag[i], reinterpret_cast<const signed char*>(&x_s[slice][warp_m + 16 * i][0]), 16);
      // w is [n, k] row-major, i.e. the [k, n] operand in column-major order.
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(w_frag[j], reinterpret_cast<const signed char*>(&w_s[slice][warp_n + 16 * j][0]), 16);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], x_frag[i], w_frag[j], acc[i][j]);
    }
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&acc_s[warp_m + 16 * i][warp_n + 16 * j], acc[i][j], kAccStride, wmma::mem_row_major);
  __syncthreads();

  Out* out = static_cast<Out*>(a.out);
  const Out* residual = static_cast<const Out*>(a.residual);
  if (a.activation == Activation::Geglu) {  // interleaved (activated, gate) column pairs
    const int64_t out_cols = a.n / 2;
    for (int idx = threadIdx.x; idx < kTileM * kTileN / 2; idx += kThreads) {
      const int r = idx / (kTileN / 2), c = 2 * (idx % (kTileN / 2));
      const int64_t m = m0 + r, n = n0 + c;
      if (m >= a.m || n >= a.n) continue;  // n and a.n are even: n + 1 is inside too
      const float xs = a.x_scale[m];
      float activated = float(acc_s[r][c]) * (a.w_scale[n] * xs);
      float gate = float(acc_s[r][c + 1]) * (a.w_scale[n + 1] * xs);
      if (a.bias) {
        activated += a.bias[n];
        gate += a.bias[n + 1];
      }
      float y = gelu(activated) * gate;
      if (residual) y += to_float(residual[m * out_cols + n / 2]);
      out[m * out_cols + n / 2] = from_float<Out>(y);
    }
    return;
  }
  for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kThreads) {
    const int r = idx / kTileN, c = idx % kTileN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= a.m || n >= a.n) continue;
    float y = float(acc_s[r][c]) * (a.w_scale[n] * a.x_scale[m]);
    if (a.bias) y += a.bias[n];
    if (a.activation == Activation::Gelu) y = gelu(y);
    if (a.activation == Activation::GeluTanh) y = gelu_tanh(y);
    if (residual) y += to_float(residual[m * a.n + n]);
    out[m * a.n + n] = from_float<Out>(y);
  }
}

constexpr int kQuantizeThreads = 256;

__device__ __forceinline__ float block_reduce(float value, bool take_max, float* scratch) {
  value = take_max ? warp_max(value) : warp_sum(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = lane < kQuantizeThreads / 32 ? scratch[lane] : 0.f;  // 0: identity of sum and of max over |x|
  return take_max ? warp_max(value) : warp_sum(value);
}

// One block per row: (LayerNorm,) smoothing, absmax, then round half away from zero.
template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_rows_kernel(QuantizeParams a) {
  __shared__ float scratch[kQuantizeThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
  float mean = 0.f, rstd = 1.f;
  if (a.norm_weight) {
    float sum = 0.f;
    for (int64_t i = threadIdx.x; i < a.k; i += kQuantizeThreads) sum += to_float(x[i]);
    mean = block_reduce(sum, false, scratch) / float(a.k);
    float squares = 0.f;
    for (int64_t i = threadIdx.x; i < a.k; i += kQuantizeThreads) {
      const float centered = to_float(x[i]) - mean;
      squares += centered * centered;
    }
    rstd = rsqrtf(block_reduce(squares, false, scratch) / float(a.k) + a.eps);
  }
  auto value = [&](int64_t i) {
    float y = to_float(x[i]);
    if (a.norm_weight) y = (y - mean) * rstd * a.norm_weight[i];
    if (a.smooth) y *= a.smooth[i];
    return y;
  };
  // x * 0 is NaN exactly where x is NaN or an Inf (fmaxf drops a NaN).
  float amax = 0.f, check = 0.f;
  for (int64_t i = threadIdx.x; i < a.k; i += kQuantizeThreads) {
    const float y = value(i);
    amax = fmaxf(amax, fabsf(y));
    check += y * 0.f;
  }
  amax = block_reduce(amax, true, scratch);
  check = block_reduce(check, false, scratch);
  // A NaN or an Inf in the row: scale NaN (the linear's output row is NaN), zeros.
  const bool finite = check == 0.f;
  const float scale = finite ? (amax > 0.f ? amax / 127.f : 1.f) : __int_as_float(0x7fc00000);
  if (threadIdx.x == 0) a.scale[row] = scale;
  for (int64_t i = threadIdx.x; i < a.k; i += kQuantizeThreads) {
    float y = __fdiv_rn(value(i), scale);
    y += y < 0.f ? -0.5f : 0.5f;
    a.q[row * a.k + i] = finite ? static_cast<int8_t>(fminf(fmaxf(y, -127.f), 127.f)) : int8_t(0);
  }
}

}  // namespace

cudaError_t launch_int8_linear(const Int8LinearParams& args, cudaStream_t stream) {
  if (args.m == 0 || args.n == 0) return cudaSuccess;
  if (args.k % 16 != 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((args.n + kTileN - 1) / kTileN), static_cast<unsigned>((args.m + kTileM - 1) / kTileM));
  return dispatch_element_type(args.out_dtype, [&](auto* typed) -> cudaError_t {
    using Out = std::remove_pointer_t<decltype(typed)>;
    int8_linear_kernel<Out><<<grid, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

cudaError_t launch_quantize_rows(const QuantizeParams& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_element_type(args.dtype, [&](auto* typed) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(typed)>;
    quantize_rows_kernel<T><<<static_cast<unsigned>(args.rows), kQuantizeThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace modernbert_kernels::cuda
