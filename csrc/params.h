// The native kernels' ABI: plain-data descriptions of each op's work, shared by the CPU kernels
// (cpu/), the CUDA kernels (cuda/) and the one place that fills them from tensors
// (tensor_params.h). Torch-free, so the ISA-specific CPU builds and the .cu files (which include
// only the CUDA runtime) can use it.
#pragma once

#include <cstdint>

namespace modernbert_kernels {

enum class ElementType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Numbered as EPILOGUES in modernbert_kernels/int8.py (4 there, int32 output, never gets here).
enum class Activation : int { None = 0, Gelu = 1, GeluTanh = 2, Geglu = 3 };

constexpr int kMaxBlockSize = 128;
constexpr int kMaxHeadDim = 256;
// A band side without bound, as the kernels take it: farther than any sequence reaches, small
// enough that a distance against it fits an int32 lane.
constexpr int64_t kUnboundedWindow = int64_t(1) << 30;

// Element strides are along (batch, head, token); head_dim has unit stride. A varlen batch
// (cu_seqlens set) packs its tokens along one axis: the batch stride is 0 and sequence b holds
// tokens cu_seqlens[b] .. cu_seqlens[b + 1].
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;   // the forward writes it, the backward reads it
  float* lse;  // natural log; +inf for a query that sees no key
  ElementType dtype;
  int64_t batch, heads, head_dim;
  int64_t seq_len;  // padded length, or max_seqlen for a varlen batch
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  int64_t lse_stride[2];       // (batch, head); tokens are contiguous
  const int32_t* cu_seqlens;   // or null
  const uint8_t* key_padding;  // [batch, seq_len], 1 = real key; or null
  const int32_t* row_offsets;  // [layout_heads, num_blocks + 1]: key blocks of each query block
  const int32_t* col_indices;
  int64_t layout_head_stride;  // 0 when one layout serves every head
  int block_size;
  // The band: query i sees key j only where -window_right <= i - j <= window_left; a side
  // without bound holds kUnboundedWindow. A window w is (w, w), causal (kUnboundedWindow, 0), a
  // sliding-window decoder (w, 0). `banded` is false when neither side is bounded.
  int64_t window_left, window_right;
  bool banded;
  float scale;
  float softcap;  // 0: scores as they are; else softcap * tanh(score / softcap), before any mask
};

#if defined(__CUDACC__)
#define MODERNBERT_KERNELS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MODERNBERT_KERNELS_HOST_DEVICE inline
#endif

// The band as a pass sees it: column c (a key, or a query in the dk/dv pass) is visible from row
// r when -below <= c - r <= above. The CPU and CUDA kernels both take it from here, so the dk/dv
// pass's swapped orientation is written once.
struct Band {
  bool on;
  int64_t below, above;

  // Rows are queries, columns keys (the forward and the dq pass).
  MODERNBERT_KERNELS_HOST_DEVICE static Band from_queries(const AttentionParams& a) {
    return {a.banded, a.window_left, a.window_right};
  }
  // Rows are keys, columns queries (the dk/dv pass).
  MODERNBERT_KERNELS_HOST_DEVICE static Band from_keys(const AttentionParams& a) {
    return {a.banded, a.window_right, a.window_left};
  }
  MODERNBERT_KERNELS_HOST_DEVICE bool sees(int64_t row, int64_t column) const {
    return !on || (column - row >= -below && column - row <= above);
  }
  // Whether no pair between rows [r0, r_last] and columns [c0, c_last] lies in the band.
  MODERNBERT_KERNELS_HOST_DEVICE bool misses(int64_t r0, int64_t r_last, int64_t c0, int64_t c_last) const {
    return on && (c0 > r_last + above || c_last < r0 - below);
  }
};

struct AttentionBackwardParams : AttentionParams {
  const void* dout;
  void* dq;  // dq, dk and dv share grad_stride
  void* dk;
  void* dv;
  float* delta;  // rowsum(dout * out), indexed like lse
  int64_t dout_stride[3], grad_stride[3];
  const int32_t* col_offsets;  // the transposed layout: query blocks of each key block
  const int32_t* row_indices;
};

struct Int8LinearParams {
  const int8_t* x_q;  // [m, k] row-major
  const int8_t* w_q;  // [n, k] row-major
  const float* x_scale;  // [m]
  const float* w_scale;  // [n]
  const float* bias;     // [n] or null
  void* out;             // [m, n], or [m, n / 2] for geglu, row-major
  const void* residual;  // like out (its shape and dtype, row-major), added last; or null
  ElementType out_dtype;
  Activation activation;
  int64_t m, n, k;
};

// Per-token int8 quantization, optionally after a bias-free LayerNorm and SmoothQuant smoothing.
struct QuantizeParams {
  const void* x;  // [rows, k], row stride x_stride
  int64_t x_stride;
  ElementType dtype;
  int64_t rows, k;
  const float* norm_weight;  // [k] or null (no LayerNorm)
  float eps;
  const float* smooth;  // [k] or null
  int8_t* q;            // [rows, k] contiguous
  float* scale;         // [rows]
};

// The activation of a gated projection (act(x A^T + a) * (x G^T + g)); None: a plain linear.
enum class Gate : int { None = 0, Gelu = 1, GeluTanh = 2, Silu = 3, Relu = 4 };

// A fp32 or bf16 linear whose weight is packed for streaming (cpu/streamed_gemm_kernel.h): in
// panels of 32 columns, each two halves of 16 whose k rows are contiguous, so a call reads the
// weight once, front to back. Gated, a panel holds 16 columns of A, then the same 16 of G.
struct StreamedLinearParams {
  const void* x;  // [m, k], row stride x_stride, unit stride along k
  int64_t x_stride;
  const void* packed;  // fp32 [panels][2][k][16], or bf16 [panels][2][k / 2][16][2] (pairs along k)
  const float* bias;   // [n], or [2 n] gated (a, then g); or null
  const void* residual;  // [m, n] contiguous, added last (plain linears only); or null
  void* out;             // [m, n] contiguous
  ElementType dtype;     // of x, the weight, residual and out: fp32 or bf16
  Gate gate;
  int64_t m, n, k, panels;
};

// The LayerNorm a streamed linear may run on its rows first: rows of x normalized into out, in x's
// dtype (as F.layer_norm returns them), the mean and variance in fp32.
struct LayerNormParams {
  const void* x;  // [rows, k], row stride x_stride, unit stride along k
  int64_t x_stride;
  void* out;  // [rows, k] contiguous
  ElementType dtype;
  int64_t rows, k;
  const float* weight;  // [k]
  const float* bias;    // [k], or null
  float eps;
};

// Rotary position embedding of rows (token, group): pair (i, i + head_dim / 2) turns by angle i.
struct RotaryParams {
  const void* x;  // [tokens, groups, head_dim], element strides (token, group), unit along head_dim
  void* out;      // like x; may be x itself (each row is read whole before it is written)
  ElementType dtype;
  int64_t tokens, groups, head_dim;
  int64_t x_stride[2], out_stride[2];
  const float* cos;  // [tokens, head_dim / 2] contiguous
  const float* sin;
};

}  // namespace modernbert_kernels
