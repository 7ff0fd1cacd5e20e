// Block-sparse attention forward and backward in CUDA: the fallback where Triton is unavailable.
//
// One warp per query row (forward, dq) or per key row (dk, dv); a thread block of kWarps rows
// stages 32 keys (or queries) at a time in shared memory. Within a chunk each lane scores one
// key against the warp's row (dot products over padded shared rows: no bank conflicts), the warp
// reduces max / sum with shuffles, and each lane then accumulates head_dim / 32 output columns
// (lane-interleaved, so shared reads and global writes are conflict-free and coalesced). Key
// ranges are cut to the window before loading, so the work follows the visible pairs; fp32
// accumulation and softmax, log2 domain. No atomics: dk / dv walk the transposed layout.
#include <type_traits>

#include "common.cuh"

namespace modernbert_kernels::cuda {
namespace {

constexpr int kWarps = 8;   // rows per thread block
constexpr int kChunk = 32;  // keys (or queries) per shared-memory stage: one per lane

struct Sequence {
  int64_t start, length;
};

__device__ __forceinline__ Sequence sequence_of(const AttentionArgs& a, int64_t batch) {
  if (a.cu_seqlens) return {a.cu_seqlens[batch], a.cu_seqlens[batch + 1] - a.cu_seqlens[batch]};
  return {0, a.seq_len};
}

__device__ __forceinline__ int64_t element_offset(const int64_t* stride, const AttentionArgs& a, int64_t batch,
                                                 int64_t head, const Sequence& seq, int64_t token) {
  return (a.cu_seqlens ? 0 : batch * stride[0]) + head * stride[1] + (seq.start + token) * stride[2];
}

__device__ __forceinline__ int64_t row_offset(const AttentionArgs& a, int64_t batch, int64_t head, const Sequence& seq,
                                             int64_t token) {
  return (a.cu_seqlens ? 0 : batch * a.lse_stride[0]) + head * a.lse_stride[1] + seq.start + token;
}

__device__ __forceinline__ bool key_is_real(const AttentionArgs& a, int64_t batch, int64_t key) {
  return a.key_padding == nullptr || a.key_padding[batch * a.seq_len + key];
}

// rows [first, first + count) of a [*, D] tensor into shared [kChunk or kWarps][D + 1] as fp32.
template <typename T, int D, int Rows>
__device__ __forceinline__ void stage_rows(float (*dst)[D + 1], const void* src, const int64_t* stride,
                                           const AttentionArgs& a, int64_t batch, int64_t head, const Sequence& seq,
                                           int64_t first, int64_t end, float scale) {
  const T* base = static_cast<const T*>(src);
  for (int idx = threadIdx.x; idx < Rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t token = first + r;
    dst[r][d] = token < end ? to_float(base[element_offset(stride, a, batch, head, seq, token) + d]) * scale : 0.f;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attention_forward_kernel(AttentionArgs a) {
  constexpr int kPerLane = D / 32;
  __shared__ float q_s[kWarps][D + 1];
  __shared__ float k_s[kChunk][D + 1];
  __shared__ float v_s[kChunk][D + 1];
  const int64_t batch = blockIdx.z, head = blockIdx.y;
  const Sequence seq = sequence_of(a, batch);
  const int64_t row0 = int64_t(blockIdx.x) * kWarps;
  if (row0 >= seq.length) return;  // uniform across the block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = row0 + warp;
  const bool row_valid = row < seq.length;
  const int64_t last_row = min(row0 + kWarps, seq.length) - 1;
  stage_rows<T, D, kWarps>(q_s, a.q, a.q_stride, a, batch, head, seq, row0, seq.length, a.scale * kLog2e);

  float row_max = -INFINITY, row_sum = 0.f, acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.f;
  const int32_t* offsets = a.row_offsets + head * a.layout_head_stride;
  const int64_t q_block = row0 / a.block_size;
  for (int32_t entry = offsets[q_block]; entry < offsets[q_block + 1]; ++entry) {
    int64_t begin = int64_t(a.col_indices[entry]) * a.block_size;
    if (begin >= seq.length) break;  // sorted: the rest lie past the sequence
    int64_t end = min(begin + a.block_size, seq.length);
    if (a.window >= 0) {
      begin = max(begin, row0 - a.window);
      end = min(end, last_row + a.window + 1);
    }
    for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
      __syncthreads();  // the previous chunk is consumed
      stage_rows<T, D, kChunk>(k_s, a.k, a.k_stride, a, batch, head, seq, chunk, end, 1.f);
      stage_rows<T, D, kChunk>(v_s, a.v, a.v_stride, a, batch, head, seq, chunk, end, 1.f);
      __syncthreads();
      if (!row_valid) continue;
      const int64_t key = chunk + lane;
      const bool visible = key < end && (a.window < 0 || llabs(row - key) <= a.window) && key_is_real(a, batch, key);
      float score = -INFINITY;
      if (visible) {
        score = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) score += q_s[warp][d] * k_s[lane][d];
      }
      const float new_max = fmaxf(row_max, warp_max(score));
      if (new_max == -INFINITY) continue;  // nothing visible to this row yet
      const float p = visible ? exp2f(score - new_max) : 0.f;
      const float rescale = exp2f(row_max - new_max);
      row_sum = row_sum * rescale + warp_sum(p);
      row_max = new_max;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[e] *= rescale;
      for (int j = 0; j < kChunk; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
        if (pj == 0.f) continue;  // uniform: every lane holds the same pj
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[e] += pj * v_s[j][e * 32 + lane];
      }
    }
  }
  if (!row_valid) return;
  const float inverse = row_sum > 0.f ? 1.f / row_sum : 0.f;
  T* out = static_cast<T*>(a.result) + element_offset(a.result_stride, a, batch, head, seq, row);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) out[e * 32 + lane] = from_float<T>(acc[e] * inverse);
  if (lane == 0)
    a.lse[row_offset(a, batch, head, seq, row)] = row_sum > 0.f ? (row_max + log2f(row_sum)) / kLog2e : INFINITY;
}

// dq for one query row per warp; also writes delta = rowsum(dout * out) for the dk / dv kernel.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attention_dq_kernel(AttentionArgs a) {
  constexpr int kPerLane = D / 32;
  __shared__ float q_s[kWarps][D + 1];
  __shared__ float do_s[kWarps][D + 1];
  __shared__ float k_s[kChunk][D + 1];
  __shared__ float v_s[kChunk][D + 1];
  const int64_t batch = blockIdx.z, head = blockIdx.y;
  const Sequence seq = sequence_of(a, batch);
  const int64_t row0 = int64_t(blockIdx.x) * kWarps;
  if (row0 >= seq.length) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = row0 + warp;
  const bool row_valid = row < seq.length;
  const int64_t last_row = min(row0 + kWarps, seq.length) - 1;
  stage_rows<T, D, kWarps>(q_s, a.q, a.q_stride, a, batch, head, seq, row0, seq.length, 1.f);
  stage_rows<T, D, kWarps>(do_s, a.dout, a.dout_stride, a, batch, head, seq, row0, seq.length, 1.f);

  float delta = 0.f, lse = INFINITY;
  if (row_valid) {
    const T* out = static_cast<const T*>(a.out) + element_offset(a.out_stride, a, batch, head, seq, row);
    const T* dout = static_cast<const T*>(a.dout) + element_offset(a.dout_stride, a, batch, head, seq, row);
    float partial = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) partial += to_float(out[e * 32 + lane]) * to_float(dout[e * 32 + lane]);
    delta = warp_sum(partial);
    const int64_t stat = row_offset(a, batch, head, seq, row);
    lse = a.lse[stat];
    if (lane == 0) a.delta[stat] = delta;
  }
  float acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.f;
  const int32_t* offsets = a.row_offsets + head * a.layout_head_stride;
  const int64_t q_block = row0 / a.block_size;
  for (int32_t entry = offsets[q_block]; entry < offsets[q_block + 1]; ++entry) {
    int64_t begin = int64_t(a.col_indices[entry]) * a.block_size;
    if (begin >= seq.length) break;
    int64_t end = min(begin + a.block_size, seq.length);
    if (a.window >= 0) {
      begin = max(begin, row0 - a.window);
      end = min(end, last_row + a.window + 1);
    }
    for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
      __syncthreads();
      stage_rows<T, D, kChunk>(k_s, a.k, a.k_stride, a, batch, head, seq, chunk, end, 1.f);
      stage_rows<T, D, kChunk>(v_s, a.v, a.v_stride, a, batch, head, seq, chunk, end, 1.f);
      __syncthreads();
      if (!row_valid || lse == INFINITY) continue;
      const int64_t key = chunk + lane;
      const bool visible = key < end && (a.window < 0 || llabs(row - key) <= a.window) && key_is_real(a, batch, key);
      float ds = 0.f;
      if (visible) {
        float score = 0.f, dp = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
          score += q_s[warp][d] * k_s[lane][d];
          dp += do_s[warp][d] * v_s[lane][d];
        }
        const float p = exp2f((score * a.scale - lse) * kLog2e);
        ds = p * (dp - delta);
      }
      for (int j = 0; j < kChunk; ++j) {
        const float dsj = __shfl_sync(kFullMask, ds, j);
        if (dsj == 0.f) continue;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[e] += dsj * k_s[j][e * 32 + lane];
      }
    }
  }
  if (!row_valid) return;
  T* dq = static_cast<T*>(a.result) + element_offset(a.result_stride, a, batch, head, seq, row);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) dq[e * 32 + lane] = from_float<T>(acc[e] * a.scale);
}

// dk and dv for one key row per warp, walking the query blocks that visit its key block.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attention_dkdv_kernel(AttentionArgs a) {
  constexpr int kPerLane = D / 32;
  __shared__ float k_s[kWarps][D + 1];
  __shared__ float v_s[kWarps][D + 1];
  __shared__ float q_s[kChunk][D + 1];
  __shared__ float do_s[kChunk][D + 1];
  __shared__ float lse_s[kChunk];
  __shared__ float delta_s[kChunk];
  const int64_t batch = blockIdx.z, head = blockIdx.y;
  const Sequence seq = sequence_of(a, batch);
  const int64_t key0 = int64_t(blockIdx.x) * kWarps;
  if (key0 >= seq.length) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t key = key0 + warp;
  const bool key_valid = key < seq.length && key_is_real(a, batch, key);
  const int64_t last_key = min(key0 + kWarps, seq.length) - 1;
  stage_rows<T, D, kWarps>(k_s, a.k, a.k_stride, a, batch, head, seq, key0, seq.length, 1.f);
  stage_rows<T, D, kWarps>(v_s, a.v, a.v_stride, a, batch, head, seq, key0, seq.length, 1.f);

  float dk[kPerLane], dv[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) dk[e] = dv[e] = 0.f;
  const int32_t* offsets = a.col_offsets + head * a.layout_head_stride;
  const int64_t k_block = key0 / a.block_size;
  for (int32_t entry = offsets[k_block]; entry < offsets[k_block + 1]; ++entry) {
    int64_t begin = int64_t(a.row_indices[entry]) * a.block_size;
    if (begin >= seq.length) break;
    int64_t end = min(begin + a.block_size, seq.length);
    if (a.window >= 0) {
      begin = max(begin, key0 - a.window);
      end = min(end, last_key + a.window + 1);
    }
    for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
      __syncthreads();
      stage_rows<T, D, kChunk>(q_s, a.q, a.q_stride, a, batch, head, seq, chunk, end, 1.f);
      stage_rows<T, D, kChunk>(do_s, a.dout, a.dout_stride, a, batch, head, seq, chunk, end, 1.f);
      if (threadIdx.x < kChunk) {
        const int64_t query = chunk + threadIdx.x;
        const bool inside = query < end;
        lse_s[threadIdx.x] = inside ? a.lse[row_offset(a, batch, head, seq, query)] : INFINITY;
        delta_s[threadIdx.x] = inside ? a.delta[row_offset(a, batch, head, seq, query)] : 0.f;
      }
      __syncthreads();
      if (!key_valid) continue;
      const int64_t query = chunk + lane;
      const bool visible = query < end && (a.window < 0 || llabs(query - key) <= a.window) && lse_s[lane] != INFINITY;
      float p = 0.f, ds = 0.f;
      if (visible) {
        float score = 0.f, dp = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
          score += q_s[lane][d] * k_s[warp][d];
          dp += do_s[lane][d] * v_s[warp][d];
        }
        p = exp2f((score * a.scale - lse_s[lane]) * kLog2e);
        ds = p * (dp - delta_s[lane]);
      }
      for (int i = 0; i < kChunk; ++i) {
        const float pi = __shfl_sync(kFullMask, p, i);
        const float dsi = __shfl_sync(kFullMask, ds, i);
        if (pi == 0.f && dsi == 0.f) continue;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) {
          dv[e] += pi * do_s[i][e * 32 + lane];
          dk[e] += dsi * q_s[i][e * 32 + lane];
        }
      }
    }
  }
  if (key >= seq.length) return;
  T* dk_out = static_cast<T*>(a.dk) + element_offset(a.result_stride, a, batch, head, seq, key);
  T* dv_out = static_cast<T*>(a.dv) + element_offset(a.result_stride, a, batch, head, seq, key);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    dk_out[e * 32 + lane] = from_float<T>(dk[e] * a.scale);
    dv_out[e * 32 + lane] = from_float<T>(dv[e]);
  }
}

template <template <typename, int> class Launch>
cudaError_t dispatch(const AttentionArgs& a, cudaStream_t stream) {
  return dispatch_element_type(a.dtype, [&](auto* typed) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(typed)>;
    switch (a.head_dim) {
      case 32: return Launch<T, 32>::run(a, stream);
      case 64: return Launch<T, 64>::run(a, stream);
      case 128: return Launch<T, 128>::run(a, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

dim3 row_grid(const AttentionArgs& a) {
  return dim3(static_cast<unsigned>((a.seq_len + kWarps - 1) / kWarps), static_cast<unsigned>(a.heads),
              static_cast<unsigned>(a.batch));
}

template <typename T, int D>
struct Forward {
  static cudaError_t run(const AttentionArgs& a, cudaStream_t stream) {
    attention_forward_kernel<T, D><<<row_grid(a), kWarps * 32, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

template <typename T, int D>
struct Backward {
  static cudaError_t run(const AttentionArgs& a, cudaStream_t stream) {
    attention_dq_kernel<T, D><<<row_grid(a), kWarps * 32, 0, stream>>>(a);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    attention_dkdv_kernel<T, D><<<row_grid(a), kWarps * 32, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_attention_forward(const AttentionArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.heads == 0 || args.seq_len == 0) return cudaSuccess;
  return dispatch<Forward>(args, stream);
}

cudaError_t launch_attention_backward(const AttentionArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.heads == 0 || args.seq_len == 0) return cudaSuccess;
  return dispatch<Backward>(args, stream);
}

}  // namespace modernbert_kernels::cuda
