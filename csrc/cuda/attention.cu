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

// Staged rows live in dynamic shared memory, each padded to D + 1 floats (column reads across
// lanes then hit distinct banks): the kWarps rows a block owns (q; or q and dout, k and v in the
// backward) and two kChunk stages of the other side. The backward's reach 82 KB at head_dim 256,
// past the 48 KB of static shared memory; 99 KB is the per-block limit of sm_86 / sm_89, the
// smallest of the GPUs that the sm_80 build runs on.
template <int D>
using SharedRows = float (*)[D + 1];

template <int D, int OwnArrays>
constexpr size_t shared_bytes() {
  return size_t(OwnArrays * kWarps + 2 * kChunk) * (D + 1) * sizeof(float);
}
static_assert(shared_bytes<256, 2>() <= 99 * 1024, "staged rows exceed sm_86's shared memory per block");

// A kernel's staged arrays, carved from the dynamic shared memory in order.
template <int D, int OwnArrays>
struct StagedRows {
  SharedRows<D> own[OwnArrays];    // [kWarps][D + 1]: the block's rows
  SharedRows<D> chunk_a, chunk_b;  // [kChunk][D + 1]: the stage of the other side
  __device__ static StagedRows carve() {
    extern __shared__ float shared[];
    float* next = shared;
    auto take = [&](int rows) {
      auto p = reinterpret_cast<SharedRows<D>>(next);
      next += rows * (D + 1);
      return p;
    };
    StagedRows s;
    for (int i = 0; i < OwnArrays; ++i) s.own[i] = take(kWarps);
    s.chunk_a = take(kChunk);
    s.chunk_b = take(kChunk);
    return s;
  }
};

struct Sequence {
  int64_t start, length;
};

// The kWarps consecutive rows (queries, or keys for dk / dv) of one (batch, head) that a thread
// block owns, one per warp.
struct RowTile {
  int64_t batch, head;
  Sequence seq;
  int64_t row0;      // the block's first row
  int64_t row;       // this warp's row
  int64_t last_row;  // the block's last row inside the sequence
  int warp, lane;
  __device__ bool empty() const { return row0 >= seq.length; }  // uniform across the block
  __device__ bool row_inside() const { return row < seq.length; }
};

__device__ __forceinline__ RowTile row_tile(const AttentionParams& a) {
  RowTile t;
  t.batch = blockIdx.z;
  t.head = blockIdx.y;
  t.seq = a.cu_seqlens ? Sequence{a.cu_seqlens[t.batch], a.cu_seqlens[t.batch + 1] - a.cu_seqlens[t.batch]}
                       : Sequence{0, a.seq_len};
  t.row0 = int64_t(blockIdx.x) * kWarps;
  t.warp = threadIdx.x / 32;
  t.lane = threadIdx.x % 32;
  t.row = t.row0 + t.warp;
  t.last_row = min(t.row0 + kWarps, t.seq.length) - 1;
  return t;
}

__device__ __forceinline__ int64_t element_offset(const int64_t* stride, const AttentionParams& a, const RowTile& t,
                                                 int64_t token) {
  return (a.cu_seqlens ? 0 : t.batch * stride[0]) + t.head * stride[1] + (t.seq.start + token) * stride[2];
}

__device__ __forceinline__ int64_t stat_offset(const AttentionParams& a, const RowTile& t, int64_t token) {
  return (a.cu_seqlens ? 0 : t.batch * a.lse_stride[0]) + t.head * a.lse_stride[1] + t.seq.start + token;
}

// Logit soft-capping of a score x (in any unit u, with the cap in the same unit): cap tanh(x / cap);
// `slope` gets its derivative 1 - tanh^2. A cap of 0 leaves x as it is.
__device__ __forceinline__ float soft_capped(float x, float cap, float* slope = nullptr) {
  if (cap == 0.f) return x;
  const float t = tanhf(x / cap);
  if (slope) *slope = 1.f - t * t;
  return cap * t;
}

__device__ __forceinline__ bool key_is_real(const AttentionParams& a, const RowTile& t, int64_t key) {
  return a.key_padding == nullptr || a.key_padding[t.batch * a.seq_len + key];
}

// Tokens [first, first + Rows) of a [*, D] tensor into shared [Rows][D + 1] as fp32 (0 past end).
template <typename T, int D, int Rows>
__device__ __forceinline__ void stage_rows(float (*dst)[D + 1], const void* src, const int64_t* stride,
                                           const AttentionParams& a, const RowTile& t, int64_t first, int64_t end,
                                           float scale) {
  const T* base = static_cast<const T*>(src);
  for (int idx = threadIdx.x; idx < Rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t token = first + r;
    dst[r][d] = token < end ? to_float(base[element_offset(stride, a, t, token) + d]) * scale : 0.f;
  }
}

// Keys and values [chunk, end) of the tile's sequence into shared memory, between barriers: the
// previous stage is consumed before it is overwritten, and this one is complete before it is read.
template <typename T, int D>
__device__ __forceinline__ void stage_keys_and_values(float (*k_s)[D + 1], float (*v_s)[D + 1],
                                                      const AttentionParams& a, const RowTile& t, int64_t chunk,
                                                      int64_t end) {
  __syncthreads();
  stage_rows<T, D, kChunk>(k_s, a.k, a.k_stride, a, t, chunk, end, 1.f);
  stage_rows<T, D, kChunk>(v_s, a.v, a.v_stride, a, t, chunk, end, 1.f);
  __syncthreads();
}

// Calls visit(chunk, end) for each stage [chunk, min(chunk + kChunk, end)) of the tokens the
// tile's rows may see: the blocks of the tile's layout row (offsets / indices: the layout, or its
// transpose for dk / dv), cut to the sequence and to the band around the tile. Uniform across
// the thread block, so visit may synchronize.
template <typename Visit>
__device__ __forceinline__ void for_each_visible_chunk(const AttentionParams& a, const Band& band,
                                                       const int32_t* offsets, const int32_t* indices,
                                                       const RowTile& t, Visit&& visit) {
  const int32_t* row = offsets + t.head * a.layout_head_stride;
  const int64_t block = t.row0 / a.block_size;
  for (int32_t entry = row[block]; entry < row[block + 1]; ++entry) {
    int64_t begin = int64_t(indices[entry]) * a.block_size;
    if (begin >= t.seq.length) break;  // sorted: the rest lie past the sequence
    int64_t end = min(begin + a.block_size, t.seq.length);
    if (band.on) {
      begin = max(begin, t.row0 - band.below);
      end = min(end, t.last_row + band.above + 1);
    }
    for (int64_t chunk = begin; chunk < end; chunk += kChunk) visit(chunk, end);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attention_forward_kernel(AttentionParams a) {
  constexpr int kPerLane = D / 32;
  const auto staged = StagedRows<D, 1>::carve();
  const SharedRows<D> q_s = staged.own[0], k_s = staged.chunk_a, v_s = staged.chunk_b;
  const RowTile t = row_tile(a);
  if (t.empty()) return;
  const int warp = t.warp, lane = t.lane;
  stage_rows<T, D, kWarps>(q_s, a.q, a.q_stride, a, t, t.row0, t.seq.length, a.scale * kLog2e);

  float row_max = -INFINITY, row_sum = 0.f, acc[kPerLane] = {};
  const Band band = Band::from_queries(a);
  for_each_visible_chunk(a, band, a.row_offsets, a.col_indices, t, [&](int64_t chunk, int64_t end) {
    stage_keys_and_values<T, D>(k_s, v_s, a, t, chunk, end);
    if (!t.row_inside()) return;
    const int64_t key = chunk + lane;
    const bool visible = key < end && band.sees(t.row, key) && key_is_real(a, t, key);
    float score = -INFINITY;
    if (visible) {
      score = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) score += q_s[warp][d] * k_s[lane][d];
      score = soft_capped(score, a.softcap * kLog2e);  // q was staged scaled by scale * log2(e)
    }
    const float new_max = fmaxf(row_max, warp_max(score));
    // Nothing visible to this row yet. fmaxf drops NaN: a NaN score still goes on, through p.
    if (new_max == -INFINITY && !__any_sync(kFullMask, score != score)) return;
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
  });
  if (!t.row_inside()) return;
  // 0 for a row that saw no key; a NaN sum (a NaN score) makes the output and lse NaN.
  const float inverse = row_sum == 0.f ? 0.f : 1.f / row_sum;
  T* out = static_cast<T*>(a.out) + element_offset(a.out_stride, a, t, t.row);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) out[e * 32 + lane] = from_float<T>(acc[e] * inverse);
  if (lane == 0) a.lse[stat_offset(a, t, t.row)] = row_sum == 0.f ? INFINITY : (row_max + log2f(row_sum)) / kLog2e;
}

// dq for one query row per warp; also writes delta = rowsum(dout * out) for the dk / dv kernel.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attention_dq_kernel(AttentionBackwardParams a) {
  constexpr int kPerLane = D / 32;
  const auto staged = StagedRows<D, 2>::carve();
  const SharedRows<D> q_s = staged.own[0], do_s = staged.own[1], k_s = staged.chunk_a, v_s = staged.chunk_b;
  const RowTile t = row_tile(a);
  if (t.empty()) return;
  const int warp = t.warp, lane = t.lane;
  stage_rows<T, D, kWarps>(q_s, a.q, a.q_stride, a, t, t.row0, t.seq.length, 1.f);
  stage_rows<T, D, kWarps>(do_s, a.dout, a.dout_stride, a, t, t.row0, t.seq.length, 1.f);

  float delta = 0.f, lse = INFINITY;
  if (t.row_inside()) {
    const T* out = static_cast<const T*>(a.out) + element_offset(a.out_stride, a, t, t.row);
    const T* dout = static_cast<const T*>(a.dout) + element_offset(a.dout_stride, a, t, t.row);
    float partial = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) partial += to_float(out[e * 32 + lane]) * to_float(dout[e * 32 + lane]);
    delta = warp_sum(partial);
    const int64_t stat = stat_offset(a, t, t.row);
    lse = a.lse[stat];
    if (lane == 0) a.delta[stat] = delta;
  }
  float acc[kPerLane] = {};
  const Band band = Band::from_queries(a);
  for_each_visible_chunk(a, band, a.row_offsets, a.col_indices, t, [&](int64_t chunk, int64_t end) {
    stage_keys_and_values<T, D>(k_s, v_s, a, t, chunk, end);
    if (!t.row_inside() || lse == INFINITY) return;
    const int64_t key = chunk + lane;
    const bool visible = key < end && band.sees(t.row, key) && key_is_real(a, t, key);
    float ds = 0.f;
    if (visible) {
      float score = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        score += q_s[warp][d] * k_s[lane][d];
        dp += do_s[warp][d] * v_s[lane][d];
      }
      float slope = 1.f;
      const float p = exp2f((soft_capped(score * a.scale, a.softcap, &slope) - lse) * kLog2e);
      ds = p * (dp - delta) * slope;
    }
    for (int j = 0; j < kChunk; ++j) {
      const float dsj = __shfl_sync(kFullMask, ds, j);
      if (dsj == 0.f) continue;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[e] += dsj * k_s[j][e * 32 + lane];
    }
  });
  if (!t.row_inside()) return;
  T* dq = static_cast<T*>(a.dq) + element_offset(a.grad_stride, a, t, t.row);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) dq[e * 32 + lane] = from_float<T>(acc[e] * a.scale);
}

// dk and dv for one key row per warp, walking the query blocks that visit its key block.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attention_dkdv_kernel(AttentionBackwardParams a) {
  constexpr int kPerLane = D / 32;
  const auto staged = StagedRows<D, 2>::carve();
  const SharedRows<D> k_s = staged.own[0], v_s = staged.own[1], q_s = staged.chunk_a, do_s = staged.chunk_b;
  __shared__ float lse_s[kChunk];
  __shared__ float delta_s[kChunk];
  const RowTile t = row_tile(a);  // rows are keys here
  if (t.empty()) return;
  const int warp = t.warp, lane = t.lane;
  const int64_t key = t.row;
  const bool key_valid = t.row_inside() && key_is_real(a, t, key);
  stage_rows<T, D, kWarps>(k_s, a.k, a.k_stride, a, t, t.row0, t.seq.length, 1.f);
  stage_rows<T, D, kWarps>(v_s, a.v, a.v_stride, a, t, t.row0, t.seq.length, 1.f);

  float dk[kPerLane] = {}, dv[kPerLane] = {};
  const Band band = Band::from_keys(a);
  for_each_visible_chunk(a, band, a.col_offsets, a.row_indices, t, [&](int64_t chunk, int64_t end) {
    __syncthreads();
    stage_rows<T, D, kChunk>(q_s, a.q, a.q_stride, a, t, chunk, end, 1.f);
    stage_rows<T, D, kChunk>(do_s, a.dout, a.dout_stride, a, t, chunk, end, 1.f);
    if (threadIdx.x < kChunk) {
      const int64_t query = chunk + threadIdx.x;
      const bool inside = query < end;
      lse_s[threadIdx.x] = inside ? a.lse[stat_offset(a, t, query)] : INFINITY;
      delta_s[threadIdx.x] = inside ? a.delta[stat_offset(a, t, query)] : 0.f;
    }
    __syncthreads();
    if (!key_valid) return;
    const int64_t query = chunk + lane;
    const bool visible = query < end && band.sees(key, query) && lse_s[lane] != INFINITY;
    float p = 0.f, ds = 0.f;
    if (visible) {
      float score = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        score += q_s[lane][d] * k_s[warp][d];
        dp += do_s[lane][d] * v_s[warp][d];
      }
      float slope = 1.f;
      p = exp2f((soft_capped(score * a.scale, a.softcap, &slope) - lse_s[lane]) * kLog2e);
      ds = p * (dp - delta_s[lane]) * slope;
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
  });
  if (!t.row_inside()) return;
  T* dk_out = static_cast<T*>(a.dk) + element_offset(a.grad_stride, a, t, key);
  T* dv_out = static_cast<T*>(a.dv) + element_offset(a.grad_stride, a, t, key);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    dk_out[e * 32 + lane] = from_float<T>(dk[e] * a.scale);
    dv_out[e * 32 + lane] = from_float<T>(dv[e]);
  }
}

// Calls Launch<T, D>::run for the params' storage type and head_dim.
template <template <typename, int> class Launch, typename Params>
cudaError_t dispatch(const Params& a, cudaStream_t stream) {
  return dispatch_element_type(a.dtype, [&](auto* typed) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(typed)>;
    switch (a.head_dim) {
      case 32: return Launch<T, 32>::run(a, stream);
      case 64: return Launch<T, 64>::run(a, stream);
      case 128: return Launch<T, 128>::run(a, stream);
      case 256: return Launch<T, 256>::run(a, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

dim3 row_grid(const AttentionParams& a) {
  return dim3(static_cast<unsigned>((a.seq_len + kWarps - 1) / kWarps), static_cast<unsigned>(a.heads),
              static_cast<unsigned>(a.batch));
}

// Launches a kernel over row_grid(a) with the staged rows' dynamic shared memory, first raising
// the kernel's limit where they need more than the default 48 KB.
template <int D, int OwnArrays, typename Params>
cudaError_t launch_rows(void (*kernel)(Params), const Params& a, cudaStream_t stream) {
  constexpr size_t bytes = shared_bytes<D, OwnArrays>();
  if constexpr (bytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (status != cudaSuccess) return status;
  }
  kernel<<<row_grid(a), kWarps * 32, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D>
struct Forward {
  static cudaError_t run(const AttentionParams& a, cudaStream_t stream) {
    return launch_rows<D, 1>(attention_forward_kernel<T, D>, a, stream);
  }
};

template <typename T, int D>
struct Backward {
  static cudaError_t run(const AttentionBackwardParams& a, cudaStream_t stream) {
    const cudaError_t status = launch_rows<D, 2>(attention_dq_kernel<T, D>, a, stream);
    if (status != cudaSuccess) return status;
    return launch_rows<D, 2>(attention_dkdv_kernel<T, D>, a, stream);
  }
};

}  // namespace

cudaError_t launch_attention_forward(const AttentionParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.seq_len == 0) return cudaSuccess;
  return dispatch<Forward>(params, stream);
}

cudaError_t launch_attention_backward(const AttentionBackwardParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.seq_len == 0) return cudaSuccess;
  return dispatch<Backward>(params, stream);
}

}  // namespace modernbert_kernels::cuda
