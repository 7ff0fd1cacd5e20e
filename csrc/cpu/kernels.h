// Plain-data descriptions of the CPU kernels' work, shared by the torch-facing code (attention.cpp,
// int8_linear.cpp) and the ISA-specific kernel builds (isa_*.cpp). Nothing here includes torch, so
// the kernel translation units can be compiled for AVX-512 / AVX2 without mixing ISA-specific code
// into inline functions that other translation units also define.
#pragma once

#include <cstddef>
#include <cstdint>

namespace modernbert_kernels::cpu {

enum class ElementType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

constexpr int kMaxBlockSize = 128;
constexpr int kMaxHeadDim = 128;

struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;         // forward: written; backward: read (the forward's output)
  const void* dout;  // backward only
  void* dq;          // backward only: dq, dk, dv share grad_stride
  void* dk;
  void* dv;
  float* lse;    // natural log; +inf for a query that sees no key
  float* delta;  // backward: rowsum(dout * out), indexed like lse
  ElementType dtype;
  int64_t batch, heads, head_dim;
  int64_t seq_len;  // padded length, or max_seqlen for a varlen batch
  // Element strides along (batch, head, token); head_dim has unit stride.
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], dout_stride[3], grad_stride[3];
  int64_t lse_stride[2];       // (batch, head); tokens are contiguous
  const int32_t* cu_seqlens;   // varlen when set: sequence b holds tokens cu[b] .. cu[b + 1]
  const uint8_t* key_padding;  // [batch, seq_len], 1 = real key; or null
  const int32_t* row_offsets;  // [layout_heads, num_blocks + 1]
  const int32_t* col_indices;
  const int32_t* col_offsets;  // the transposed layout (backward)
  const int32_t* row_indices;
  int64_t layout_head_stride;  // 0 when one layout serves every head
  int block_size;
  int64_t window;  // < 0: no window
  float scale;
  int cache_slots;  // forward: packed key blocks kept per thread (attention_cache_slots)
};

// Work item = (batch, head, query block); a call handles items [begin, end) with a private
// workspace of attention_workspace_floats(...) floats. Packed key blocks are kept in an LRU cache:
// consecutive items of one head share key blocks (a window visits blocks m - 1, m, m + 1; a dense
// row visits all of them, so the cache holds a whole head's keys when they fit its budget).
constexpr int kAttentionRowTile = 4;
constexpr int kMaxCacheSlots = 1024;
constexpr size_t kCacheBudgetFloats = size_t(8) << 20 >> 2;  // 8 MiB per thread

// Per slot: keys transposed [head_dim][block], values as fp32 [block][head_dim] (16-bit inputs
// only), key bias [block].
inline size_t attention_slot_floats(int block_size, int head_dim, bool fp32) {
  return size_t(head_dim) * block_size * (fp32 ? 1 : 2) + block_size;
}

inline int attention_cache_slots(int64_t num_blocks, size_t slot_floats) {
  int64_t slots = int64_t(kCacheBudgetFloats / slot_floats);
  slots = slots < num_blocks ? slots : num_blocks;
  slots = slots < 6 ? 6 : slots;
  return int(slots < kMaxCacheSlots ? slots : kMaxCacheSlots);
}

// q tile and output accumulators, scores, row max and sum, then the key cache.
inline size_t attention_workspace_floats(int cache_slots, size_t slot_floats) {
  return 2 * (kMaxBlockSize + kAttentionRowTile) * kMaxHeadDim + kAttentionRowTile * kMaxBlockSize +
         2 * (kMaxBlockSize + kAttentionRowTile) + size_t(cache_slots) * slot_floats;
}

using AttentionForwardFn = void (*)(const AttentionArgs&, int64_t begin, int64_t end, float* workspace);

// The backward runs in two passes over work items: (batch, head, query block) computing dq and
// delta, then (batch, head, key block) computing dk and dv over the transposed layout (no atomics).
enum class BackwardPass : int { Dq = 0, DkDv = 1 };
constexpr int kBackwardCacheSlots = 4;
// Per slot: two blocks transposed [head_dim][block], two as fp32 rows [block][head_dim], two vectors.
constexpr size_t kBackwardSlotFloats = 4 * kMaxHeadDim * kMaxBlockSize + 2 * kMaxBlockSize;
// Two row tiles, two accumulators, two score tiles, two row statistics, then the cache.
constexpr size_t kAttentionBackwardWorkspaceFloats = 4 * (kMaxBlockSize + kAttentionRowTile) * kMaxHeadDim +
                                                    2 * kAttentionRowTile * kMaxBlockSize +
                                                    2 * (kMaxBlockSize + kAttentionRowTile) +
                                                    kBackwardCacheSlots * kBackwardSlotFloats;
using AttentionBackwardFn = void (*)(const AttentionArgs&, BackwardPass pass, int64_t begin, int64_t end,
                                     float* workspace);

enum class Activation : int { None = 0, Gelu = 1, GeluTanh = 2, Geglu = 3 };

struct Int8EpilogueArgs {
  const int32_t* acc;  // [rows, n] int32, row stride acc_stride
  int64_t acc_stride;
  const float* x_scale;  // [rows]
  const float* w_scale;  // [n]
  const float* bias;     // [n] or null
  void* out;             // [rows, n or n / 2], row stride out_stride
  int64_t out_stride;
  ElementType out_dtype;
  Activation activation;
  int64_t n;
};
using Int8EpilogueFn = void (*)(const Int8EpilogueArgs&, int64_t row_begin, int64_t row_end);

struct QuantizeArgs {
  const void* x;  // [rows, k], row stride x_stride
  int64_t x_stride;
  ElementType dtype;
  int64_t k;
  const float* norm_weight;  // bias-free LayerNorm weight [k] or null (no LayerNorm)
  float eps;
  const float* smooth;  // [k] or null
  int8_t* q;            // [rows, k] contiguous
  float* scale;         // [rows]
};
// A call handles rows [begin, end) with a private workspace of k floats.
using QuantizeFn = void (*)(const QuantizeArgs&, int64_t row_begin, int64_t row_end, float* workspace);

// Rotary position embedding (half-split pairs (i, i + head_dim / 2)) of rows (token, group).
struct RotaryArgs {
  const void* x;  // [tokens, groups, head_dim], element strides (token, group), unit along head_dim
  void* out;      // like x; may be x itself (each row is read whole before it is written)
  ElementType dtype;
  int64_t tokens, groups, head_dim;
  int64_t x_stride[2], out_stride[2];
  const float* cos;  // [tokens, head_dim / 2] contiguous
  const float* sin;
};
using RotaryFn = void (*)(const RotaryArgs&, int64_t token_begin, int64_t token_end);

struct KernelTable {
  const char* isa;
  AttentionForwardFn attention_forward;
  AttentionBackwardFn attention_backward;
  Int8EpilogueFn int8_epilogue;
  QuantizeFn quantize_rows;
  RotaryFn rotary;
};

// The best build this CPU can run, chosen once at first use (not at build time, so one wheel
// serves every x86-64 machine).
const KernelTable& kernels();

}  // namespace modernbert_kernels::cpu
