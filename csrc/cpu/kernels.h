// The CPU kernels' entry points (one table per ISA build, isa_*.cpp) and their workspace sizes,
// over the shared parameter structs of ../params.h. Nothing here includes torch, so the kernel
// translation units can be compiled for AVX-512 / AVX2 without mixing ISA-specific code into
// inline functions that other translation units also define.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../params.h"

namespace modernbert_kernels::cpu {

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

// Score rows the forward's workspace holds: one row tile's, or an AMX tile's 16 (the amx build).
constexpr int kAttentionScoreRows = 16;

// q tile and output accumulators, scores, row max and sum, the AMX products of P V
// [kAttentionScoreRows][kMaxHeadDim], then the key cache.
inline size_t attention_workspace_floats(int cache_slots, size_t slot_floats) {
  return 2 * (kMaxBlockSize + kAttentionRowTile) * kMaxHeadDim + kAttentionScoreRows * kMaxBlockSize +
         2 * (kMaxBlockSize + kAttentionRowTile) + kAttentionScoreRows * kMaxHeadDim +
         size_t(cache_slots) * slot_floats;
}

// cache_slots: packed key blocks kept per thread (attention_cache_slots).
using AttentionForwardFn = void (*)(const AttentionParams&, int cache_slots, int64_t begin, int64_t end,
                                   float* workspace);

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
using AttentionBackwardFn = void (*)(const AttentionBackwardParams&, BackwardPass pass, int64_t begin, int64_t end,
                                     float* workspace);

// The epilogue of int8_linear for rows [row_begin, row_end) x columns [col_begin, col_end): acc
// holds their int32 products, row stride acc_stride. col_begin is a multiple of 32 (whole vectors,
// whole GeGLU pairs); col_end is one too, or n.
using Int8EpilogueFn = void (*)(const Int8LinearParams&, const int32_t* acc, int64_t acc_stride, int64_t row_begin,
                                int64_t row_end, int64_t col_begin, int64_t col_end);
// A call handles rows [begin, end) with a private workspace of k floats.
using QuantizeFn = void (*)(const QuantizeParams&, int64_t row_begin, int64_t row_end, float* workspace);
using RotaryFn = void (*)(const RotaryParams&, int64_t token_begin, int64_t token_end);

// The streamed linear's panels [panel_begin, panel_end) for every row (streamed_gemm_kernel.h).
using StreamedLinearFn = void (*)(const StreamedLinearParams&, int64_t panel_begin, int64_t panel_end);
constexpr int kStreamedPanelCols = 32;
// Its LayerNorm prologue: rows [begin, end), with a workspace of k floats.
using LayerNormFn = void (*)(const LayerNormParams&, int64_t row_begin, int64_t row_end, float* workspace);
// How far ahead of its loads a GEMM that streams a weight from memory prefetches each stream (the
// streamed linear; the AMX int8 GEMM on a panel's first row block).
constexpr int kWeightPrefetchBytes = 4096;

// The library's own exact int8 GEMMs: the weight ([n, k] int8) packed in panels
// [panel_begin, panel_end) of `cols` columns, K padded to a multiple of k_align, then the int32 sums
// of rows of x against it, with a workspace of workspace_ints(rows, k) ints. Two of them: the
// int16-pair kernel of CPUs without an int8 dot product (int8_gemm_kernel.h, in each x86 build's
// table) and the AMX tile kernel (amx_int8_gemm_kernel.h, amx_int8_gemm()).
struct Int8Gemm {
  int cols;       // output columns per packed panel
  int tile_rows;  // rows per register tile
  int k_align;    // K is padded to a multiple of this in the packed weight
  void (*pack_weight)(const int8_t* w, int64_t n, int64_t k, int64_t panel_begin, int64_t panel_end, int8_t* packed);
  void (*rows)(const int8_t* x, int64_t rows, int64_t k, const int8_t* packed_w, int64_t n, int32_t* sums,
               int32_t* workspace);
  int64_t (*workspace_ints)(int64_t rows, int64_t k);
};

inline int64_t int8_gemm_panels(int64_t n, int cols) { return (n + cols - 1) / cols; }
inline int64_t int8_gemm_packed_weight_bytes(const Int8Gemm& gemm, int64_t n, int64_t k) {
  return int8_gemm_panels(n, gemm.cols) * gemm.cols * ((k + gemm.k_align - 1) / gemm.k_align * gemm.k_align);
}

// Whether isa_amx.cpp is compiled in: x86-64, with a compiler that has the AMX intrinsics.
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 11)
#define MBK_AMX_BUILD 1
#else
#define MBK_AMX_BUILD 0
#endif

// The AMX int8 GEMM, or null where it cannot run: no AMX-INT8 on the CPU, the OS refusing this
// process the tile registers, a build without it, or MODERNBERT_KERNELS_CPU_ISA set to anything
// but amx. Decided once.
const Int8Gemm* amx_int8_gemm();

struct KernelTable {
  const char* isa;
  AttentionForwardFn attention_forward;
  AttentionBackwardFn attention_backward;
  Int8EpilogueFn int8_epilogue;
  QuantizeFn quantize_rows;
  RotaryFn rotary;
  Int8Gemm int8_gemm;  // x86 builds only; elsewhere its functions are null
  StreamedLinearFn streamed_linear;
  LayerNormFn layer_norm;
};

// The best build this CPU can run, chosen once at first use (not at build time, so one wheel
// serves every x86-64 machine).
const KernelTable& kernels();

}  // namespace modernbert_kernels::cpu
