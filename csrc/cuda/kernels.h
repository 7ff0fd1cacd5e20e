// Plain-data descriptions of the CUDA kernels' work and their launchers. The .cu files include
// only the CUDA runtime (they build in about a second); ops_cuda.cpp turns tensors into these
// structs and registers the ops.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace modernbert_kernels::cuda {

enum class ElementType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // forward output (read by the backward)
  const void* dout;  // backward only
  void* result;      // forward: out; backward: dq
  void* dk;          // backward only
  void* dv;          // backward only
  float* lse;        // natural log, +inf for a row that sees nothing: written by the forward
  float* delta;      // backward: rowsum(dout * out), same indexing as lse
  ElementType dtype;
  int64_t batch, heads, head_dim;
  int64_t seq_len;  // padded length, or max_seqlen for a varlen batch
  // Element strides along (batch, head, token) of q / k / v / out / dout and of the results
  // (dq, dk, dv and the forward output, all allocated contiguous like q).
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], dout_stride[3], result_stride[3];
  int64_t lse_stride[2];       // (batch, head); tokens contiguous
  const int32_t* cu_seqlens;   // varlen when set
  const uint8_t* key_padding;  // [batch, seq_len], 1 = real key; or null
  const int32_t* row_offsets;  // [layout_heads, num_blocks + 1]
  const int32_t* col_indices;
  const int32_t* col_offsets;  // transposed layout (backward)
  const int32_t* row_indices;
  int64_t layout_head_stride;  // 0 when one layout serves every head
  int block_size;
  int64_t window;  // < 0: no window
  float scale;
};

cudaError_t launch_attention_forward(const AttentionArgs& args, cudaStream_t stream);
// Two kernels: dq (which also writes delta), then dk and dv over the transposed layout.
cudaError_t launch_attention_backward(const AttentionArgs& args, cudaStream_t stream);

enum class Activation : int { None = 0, Gelu = 1, GeluTanh = 2, Geglu = 3 };

struct Int8LinearArgs {
  const int8_t* x_q;  // [m, k] row-major
  const int8_t* w_q;  // [n, k] row-major
  const float* x_scale;
  const float* w_scale;
  const float* bias;  // or null
  void* out;          // [m, n] or [m, n / 2] for geglu, row-major
  ElementType out_dtype;
  Activation activation;
  int64_t m, n, k;  // k a multiple of 16
};

cudaError_t launch_int8_linear(const Int8LinearArgs& args, cudaStream_t stream);

struct QuantizeArgs {
  const void* x;  // [rows, k], row stride x_stride
  int64_t x_stride;
  ElementType dtype;
  int64_t rows, k;
  const float* norm_weight;  // or null
  float eps;
  const float* smooth;  // or null
  int8_t* q;            // [rows, k] contiguous
  float* scale;         // [rows]
};

cudaError_t launch_quantize_rows(const QuantizeArgs& args, cudaStream_t stream);

// Rotary position embedding of rows (token, group): pair (i, i + head_dim / 2) turns by angle i.
struct RotaryArgs {
  const void* x;  // [tokens, groups, head_dim], element strides (token, group), unit along head_dim
  void* out;      // like x; may be x itself
  ElementType dtype;
  int64_t tokens, groups, head_dim;
  int64_t x_stride[2], out_stride[2];
  const float* cos;  // [tokens, head_dim / 2] contiguous
  const float* sin;
};

cudaError_t launch_rotary(const RotaryArgs& args, cudaStream_t stream);

}  // namespace modernbert_kernels::cuda
