// The streamed linear: a fp32 / bf16 GEMM for a few rows, where the time is the weight's trip from
// memory. The weight is packed once in panels of 32 columns, each two half-panels of 16 columns
// whose k rows are contiguous, so a call reads it front to back, each byte once, as two streams a
// core reads side by side; every row of x is computed against a panel while it is in the core: a
// register block of up to kStreamRows rows holds all its accumulators, and later blocks re-read the
// panel from L2. A software prefetch runs kWeightPrefetchBytes ahead of each stream: in a prototype
// on a 2-core Xeon it took 16 rows over the encoder's weights from 11 to 15-16 GB/s, and two streams
// instead of one to 18-20 (oneDNN's packed GEMM streams 10-11; NOTES "A GEMM that streams its
// weight"). bf16 runs on AMX tiles in the amx build (K a multiple of 32), where vdpbf16ps could not
// keep up with the stream. Included by the isa_*.cpp builds.
#pragma once

#include <cstring>

#include "rows.h"

namespace {

using modernbert_kernels::Gate;
using modernbert_kernels::LayerNormParams;
using modernbert_kernels::StreamedLinearParams;
using modernbert_kernels::cpu::kStreamedPanelCols;
using modernbert_kernels::cpu::kWeightPrefetchBytes;

constexpr int kHalfPanelCols = kStreamedPanelCols / 2;
constexpr int kStreamVectors = kStreamedPanelCols / kLanes;
constexpr int kHalfVectors = kStreamVectors / 2;
// Rows per register block, rows x kStreamVectors accumulators: on AVX-512, 16 rows' 32 accumulators
// and a panel row spill four accumulators, yet measured faster than 8 or 12 rows (which re-read the
// panel); AVX2 (16 ymm) and the 4-lane baseline (16 xmm) keep theirs in registers.
constexpr int kStreamRows = kLanes == 16 ? 16 : kLanes == 8 ? 2 : 1;

// The 64-byte line of a stream kWeightPrefetchBytes ahead of p (each half-panel row is one line).
inline void prefetch_ahead(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + kWeightPrefetchBytes, 0, 3); }

// tile[r][c] = sum_i x[r][i] * panel[c / 16][i][c % 16] for R rows of fp32 x and one fp32 panel
// [2][k][16].
template <int R>
inline void streamed_products_fp32(const float* x, int64_t x_stride, int64_t k, const float* panel, float* tile) {
  vfloat acc[R][kStreamVectors] = {};
  for (int64_t i = 0; i < k; ++i) {
    vfloat columns[kStreamVectors];
    for (int h = 0; h < 2; ++h) {
      const float* w = panel + (h * k + i) * kHalfPanelCols;
      prefetch_ahead(w);
      for (int v = 0; v < kHalfVectors; ++v) columns[h * kHalfVectors + v] = load(w + v * kLanes);
    }
    for (int r = 0; r < R; ++r) {
      const vfloat a = splat(x[r * x_stride + i]);
      for (int v = 0; v < kStreamVectors; ++v) acc[r][v] = vfma(a, columns[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kStreamVectors; ++v) store(tile + r * kStreamedPanelCols + v * kLanes, acc[r][v]);
}

// The same for bf16 x and a bf16 panel [2][k / 2][16][2]: each 32-bit lane of a half-panel row
// holds one column's pair (k = 2i, 2i + 1). Products of bf16 are exact in fp32, and the sums are fp32.
template <int R>
inline void streamed_products_bf16(const uint16_t* x, int64_t x_stride, int64_t k, const uint16_t* panel,
                                   float* tile) {
  vfloat acc[R][kStreamVectors] = {};
  for (int64_t i = 0; i < k / 2; ++i) {
    const uint16_t* halves[2] = {panel + i * 2 * kHalfPanelCols, panel + (k / 2 + i) * 2 * kHalfPanelCols};
    prefetch_ahead(halves[0]);
    prefetch_ahead(halves[1]);
#if MBK_BF16_DOT
    // vdpbf16ps: both products of a pair and their sum in one instruction.
    __m512bh columns[kStreamVectors];
    for (int v = 0; v < kStreamVectors; ++v)
      columns[v] = (__m512bh)_mm512_loadu_si512(halves[v / kHalfVectors] + v % kHalfVectors * 2 * kLanes);
    for (int r = 0; r < R; ++r) {
      int pair;
      std::memcpy(&pair, x + r * x_stride + 2 * i, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < kStreamVectors; ++v) acc[r][v] = (vfloat)_mm512_dpbf16_ps((__m512)acc[r][v], a, columns[v]);
    }
#else
    // Widened: a pair's low half is the even k's bf16, its high half the odd k's.
    vfloat even[kStreamVectors], odd[kStreamVectors];
    for (int v = 0; v < kStreamVectors; ++v) {
      const vint pairs = load_int(reinterpret_cast<const int*>(halves[v / kHalfVectors]) + v % kHalfVectors * kLanes);
      even[v] = (vfloat)(pairs << 16);
      odd[v] = (vfloat)(pairs & int(0xffff0000u));
    }
    for (int r = 0; r < R; ++r) {
      const vfloat a0 = splat(bf16_to_float(x[r * x_stride + 2 * i]));
      const vfloat a1 = splat(bf16_to_float(x[r * x_stride + 2 * i + 1]));
      for (int v = 0; v < kStreamVectors; ++v) acc[r][v] = vfma(a1, odd[v], vfma(a0, even[v], acc[r][v]));
    }
#endif
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kStreamVectors; ++v) store(tile + r * kStreamedPanelCols + v * kLanes, acc[r][v]);
}

// The products of `rows` (1..kStreamRows) rows: the register block sized to them.
template <int R = kStreamRows>
inline void streamed_products(const StreamedLinearParams& p, int rows, const void* x, const void* panel, float* tile) {
  if constexpr (R > 1) {
    if (rows < R) return streamed_products<R - 1>(p, rows, x, panel, tile);
  }
  if (p.dtype == ElementType::Float32)
    streamed_products_fp32<R>(static_cast<const float*>(x), p.x_stride, p.k, static_cast<const float*>(panel), tile);
  else
    streamed_products_bf16<R>(static_cast<const uint16_t*>(x), p.x_stride, p.k, static_cast<const uint16_t*>(panel),
                              tile);
}

inline vfloat gate_activation(vfloat v, Gate gate) {
  switch (gate) {
    case Gate::Gelu: return vgelu(v);
    case Gate::GeluTanh: return vgelu_tanh(v);
    case Gate::Silu: return v / (1.f + vexp(vmin(-v, splat(88.f))));  // e^88 is finite in fp32
    default: return vmax(v, splat(0.f));  // Relu
  }
}

// kLanes outputs from `count` <= kLanes columns at out + offset (a vector store when whole).
inline void store_columns(const StreamedLinearParams& p, int64_t offset, int count, vfloat y) {
  if (count == kLanes) {
    if (p.dtype == ElementType::Float32)
      store(static_cast<float*>(p.out) + offset, y);
    else
      store_bf16(static_cast<uint16_t*>(p.out) + offset, y);
    return;
  }
  for (int c = 0; c < count; ++c) store_element(p.out, offset + c, y[c], p.dtype);
}

inline vfloat load_columns(const void* base, int64_t offset, int count, ElementType dtype) {
  if (count == kLanes)
    return dtype == ElementType::Float32 ? load(static_cast<const float*>(base) + offset)
                                         : load_bf16(static_cast<const uint16_t*>(base) + offset);
  vfloat v = {};
  for (int c = 0; c < count; ++c) v[c] = load_element(base, offset + c, dtype);
  return v;
}

inline vfloat bias_columns(const float* bias, int64_t col, int count) {
  if (bias == nullptr) return vfloat{};
  if (count == kLanes) return load(bias + col);
  vfloat v = {};
  for (int c = 0; c < count; ++c) v[c] = bias[col + c];
  return v;
}

// Rows [row, row + rows) of one panel's outputs from its tile: bias, then the residual (plain) or
// the gate (gated), rounded to the output dtype once.
inline void streamed_epilogue(const StreamedLinearParams& p, const float* tile, int64_t row, int rows, int64_t panel) {
  const bool gated = p.gate != Gate::None;
  const int panel_outputs = gated ? kStreamedPanelCols / 2 : kStreamedPanelCols;
  const int64_t first = panel * panel_outputs;
  for (int r = 0; r < rows; ++r) {
    const float* acc = tile + r * kStreamedPanelCols;
    const int64_t out_row = (row + r) * p.n;
    for (int c = 0; c < panel_outputs; c += kLanes) {
      const int64_t col = first + c;
      if (col >= p.n) break;
      const int count = int(p.n - col < kLanes ? p.n - col : kLanes);
      vfloat y = load(acc + c) + bias_columns(p.bias, col, count);
      if (gated) {
        const vfloat gate = load(acc + panel_outputs + c) + bias_columns(p.bias ? p.bias + p.n : nullptr, col, count);
        y = gate_activation(y, p.gate) * gate;
      } else if (p.residual != nullptr) {
        y += load_columns(p.residual, out_row + col, count, p.dtype);
      }
      store_columns(p, out_row + col, count, y);
    }
  }
}

#ifdef MBK_AMX_TILES
// bf16 on AMX-BF16 tiles (the amx build), for K a multiple of 32: 16 rows of a half-panel, 16 pairs
// of K for 16 columns, are one B tile as tdpbf16ps reads it, so the packed layout is the same. Where
// vdpbf16ps computes ~120 GFLOP/s at 16 rows, two cores short of the weight's rate from memory, one
// tdpbf16ps does 16 x 16 x 32 multiply-adds. A block is up to 32 rows, so each B tile loaded feeds
// two tdpbf16ps: tiles 0-3 the sums (rows 0-15 and 16-31 of the two halves), 4 and 5 the rows of x,
// 6 and 7 the halves' B tiles; the tiles of each 16 rows configured to the rows the block has.
constexpr int kAmxTileK = 32;
constexpr int kAmxStreamRows = 32;

inline void amx_configure_stream_block(int rows) {
  const int upper = rows < 16 ? rows : 16, lower = rows > 16 ? rows - 16 : 1;
  amx_configure_tiles({upper, upper, lower, lower, upper, lower, 16, 16});
}

// tile[r][c] for the block's rows of x against one panel; `rows` is what amx_configure_stream_block set.
inline void streamed_products_amx(const uint16_t* x, int64_t x_stride, int rows, int64_t k, const uint16_t* panel,
                                  float* tile) {
  const uint16_t* halves[2] = {panel, panel + k * kHalfPanelCols};
  const bool two = rows > 16;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < k; i += kAmxTileK) {
    const uint16_t* b0 = halves[0] + i * kHalfPanelCols;
    const uint16_t* b1 = halves[1] + i * kHalfPanelCols;
    for (int line = 0; line < 16; ++line) {
      prefetch_ahead(b0 + line * 2 * kHalfPanelCols);
      prefetch_ahead(b1 + line * 2 * kHalfPanelCols);
    }
    _tile_loadd(4, x + i, x_stride * 2);
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (!two) continue;
    _tile_loadd(5, x + 16 * x_stride + i, x_stride * 2);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, tile, kStreamedPanelCols * 4);
  _tile_stored(1, tile + kHalfPanelCols, kStreamedPanelCols * 4);
  if (!two) return;
  _tile_stored(2, tile + 16 * kStreamedPanelCols, kStreamedPanelCols * 4);
  _tile_stored(3, tile + 16 * kStreamedPanelCols + kHalfPanelCols, kStreamedPanelCols * 4);
}

void streamed_linear_panels_amx(const StreamedLinearParams& p, int64_t panel_begin, int64_t panel_end) {
  alignas(64) float tile[kAmxStreamRows * kStreamedPanelCols];
  const int64_t panel_elements = p.k * kStreamedPanelCols;
  int configured_rows = 0;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const auto* weights = static_cast<const uint16_t*>(p.packed) + panel * panel_elements;
    for (int64_t row = 0; row < p.m; row += kAmxStreamRows) {
      const int rows = int(p.m - row < kAmxStreamRows ? p.m - row : kAmxStreamRows);
      if (rows != configured_rows) amx_configure_stream_block(configured_rows = rows);
      streamed_products_amx(static_cast<const uint16_t*>(p.x) + row * p.x_stride, p.x_stride, rows, p.k, weights, tile);
      streamed_epilogue(p, tile, row, rows, panel);
    }
  }
  if (configured_rows) _tile_release();
}
#endif

void streamed_linear_panels(const StreamedLinearParams& p, int64_t panel_begin, int64_t panel_end) {
#ifdef MBK_AMX_TILES
  if (p.dtype == ElementType::BFloat16 && p.k % kAmxTileK == 0)
    return streamed_linear_panels_amx(p, panel_begin, panel_end);
#endif
  alignas(64) float tile[kStreamRows * kStreamedPanelCols];
  const int64_t element_bytes = p.dtype == ElementType::Float32 ? 4 : 2;
  const int64_t panel_bytes = p.k * kStreamedPanelCols * element_bytes;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const void* weights = static_cast<const char*>(p.packed) + panel * panel_bytes;
    for (int64_t row = 0; row < p.m; row += kStreamRows) {
      const int rows = int(p.m - row < kStreamRows ? p.m - row : kStreamRows);
      const void* x = static_cast<const char*>(p.x) + row * p.x_stride * element_bytes;
      streamed_products(p, rows, x, weights, tile);
      streamed_epilogue(p, tile, row, rows, panel);
    }
  }
}

// The LayerNorm prologue: rows [row_begin, row_end) of x normalized into out, through one fp32 row.
void layer_norm_rows(const LayerNormParams& p, int64_t row_begin, int64_t row_end, float* row) {
  for (int64_t m = row_begin; m < row_end; ++m) {
    load_row(p.x, m * p.x_stride, p.dtype, 1.f, int(p.k), row);
    normalize_row(row, p.k, p.weight, p.bias, p.eps);
    store_row(p.out, m * p.k, p.dtype, 1.f, int(p.k), row);
  }
}

}  // namespace
