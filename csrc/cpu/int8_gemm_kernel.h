// An exact int8 GEMM for x86 CPUs without an int8 dot-product instruction (no VNNI, no AMX). There
// oneDNN's int8 GEMM multiplies u8 x s8 pairs whose sums saturate at int16 and runs ~25x slower
// than an fp32 GEMM. Here the int8 values are widened to int16 and multiplied with pmaddwd, which
// sums two int16 products into each int32 lane: 2 x lanes multiply-adds an instruction, twice an
// fp32 FMA's. Exact: a pair sums to at most 2 x 128^2 (< 2^31), and a row to K x 128^2, within
// int32 for the K <= 2^17 that prepare_int8_linear allows.
//
// Layouts, in int32 words that each hold two int16 (k even, k odd; an odd K is padded with 0):
//   weight, packed once per call: panels of kGemmCols output columns, [k / 2][kGemmCols] each;
//   activations, packed per row chunk: tiles of kGemmRows rows, [k / 2][kGemmRows] each.
// A register tile of kGemmRows x kGemmCols int32 sums runs over the whole K, reading its weight
// panel (K x kGemmCols x 2 bytes, 24 KB at K = 768 with AVX2) from L1 / L2 for every tile of the
// chunk. Included by the x86 isa_*.cpp builds (SSE2, AVX2, AVX-512BW pmaddwd), after vec.h and
// <immintrin.h>.
#pragma once

namespace {

constexpr int kGemmCols = 2 * kLanes;
// rows x 2 accumulators + 2 weight vectors + 1 broadcast: 27 of 32 zmm, 15 of 16 ymm / xmm.
constexpr int kGemmRows = kLanes == 16 ? 12 : 6;

inline vint madd_pairs(vint a, vint b) {
#if MBK_LANES == 16
  return (vint)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif MBK_LANES == 8
  return (vint)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#else
  return (vint)_mm_madd_epi16((__m128i)a, (__m128i)b);
#endif
}

// Two int8 values as the int16 pair of one int32 word (low half first, as pmaddwd reads them).
inline int32_t int16_pair(int8_t low, int8_t high) {
  return int32_t(uint32_t(uint16_t(int16_t(low))) | (uint32_t(uint16_t(int16_t(high))) << 16));
}

// Panels [panel_begin, panel_end) of w ([n, k] int8, row-major) into packed.
void int8_gemm_pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t panel_begin, int64_t panel_end,
                           int32_t* packed) {
  const int64_t pairs = (k + 1) / 2;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    int32_t* out = packed + panel * pairs * kGemmCols;
    for (int c = 0; c < kGemmCols; ++c) {
      const int64_t col = panel * kGemmCols + c;
      const int8_t* row = w + col * k;
      if (col >= n) {
        for (int64_t p = 0; p < pairs; ++p) out[p * kGemmCols + c] = 0;
        continue;
      }
      for (int64_t p = 0; p < k / 2; ++p) out[p * kGemmCols + c] = int16_pair(row[2 * p], row[2 * p + 1]);
      if (k % 2) out[(pairs - 1) * kGemmCols + c] = int16_pair(row[k - 1], 0);
    }
  }
}

// One register tile: sums[r][c] = row r of a_tile . column c of w_panel, over `pairs` int16 pairs;
// the first `rows` x `cols` of it stored to c (row stride ldc).
inline void int8_gemm_tile(const int32_t* a_tile, const int32_t* w_panel, int64_t pairs, int rows, int cols,
                           int32_t* c, int64_t ldc) {
  vint sums[kGemmRows][2];
#pragma GCC unroll 16
  for (int r = 0; r < kGemmRows; ++r) sums[r][0] = sums[r][1] = vint{};
  for (int64_t p = 0; p < pairs; ++p) {
    const vint w0 = load_int(w_panel + p * kGemmCols), w1 = load_int(w_panel + p * kGemmCols + kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < kGemmRows; ++r) {
      const vint a = vint{} + a_tile[p * kGemmRows + r];
      sums[r][0] += madd_pairs(a, w0);
      sums[r][1] += madd_pairs(a, w1);
    }
  }
  if (rows == kGemmRows && cols == kGemmCols) {
#pragma GCC unroll 16
    for (int r = 0; r < kGemmRows; ++r) {
      *reinterpret_cast<vint_u*>(c + r * ldc) = sums[r][0];
      *reinterpret_cast<vint_u*>(c + r * ldc + kLanes) = sums[r][1];
    }
    return;
  }
  int32_t tile[kGemmRows][kGemmCols];
  for (int r = 0; r < kGemmRows; ++r) {
    *reinterpret_cast<vint_u*>(tile[r]) = sums[r][0];
    *reinterpret_cast<vint_u*>(tile[r] + kLanes) = sums[r][1];
  }
  for (int r = 0; r < rows; ++r) __builtin_memcpy(c + r * ldc, tile[r], cols * sizeof(int32_t));
}

// sums ([rows, n] int32, row-major) = x ([rows, k] int8, row-major) . w^T, w packed by
// int8_gemm_pack_weight; workspace holds int8_gemm_workspace_ints(rows, k, kGemmRows) ints.
void int8_gemm_rows(const int8_t* x, int64_t rows, int64_t k, const int32_t* packed_w, int64_t n, int32_t* sums,
                    int32_t* workspace) {
  const int64_t pairs = (k + 1) / 2, tiles = (rows + kGemmRows - 1) / kGemmRows;
  for (int64_t t = 0; t < tiles; ++t) {
    int32_t* out = workspace + t * pairs * kGemmRows;
    for (int r = 0; r < kGemmRows; ++r) {
      const int64_t row = t * kGemmRows + r;
      const int8_t* x_row = x + row * k;
      if (row >= rows) {
        for (int64_t p = 0; p < pairs; ++p) out[p * kGemmRows + r] = 0;
        continue;
      }
      for (int64_t p = 0; p < k / 2; ++p) out[p * kGemmRows + r] = int16_pair(x_row[2 * p], x_row[2 * p + 1]);
      if (k % 2) out[(pairs - 1) * kGemmRows + r] = int16_pair(x_row[k - 1], 0);
    }
  }
  const int64_t panels = (n + kGemmCols - 1) / kGemmCols;
  for (int64_t panel = 0; panel < panels; ++panel) {
    const int cols = int(n - panel * kGemmCols < kGemmCols ? n - panel * kGemmCols : kGemmCols);
    for (int64_t t = 0; t < tiles; ++t) {
      const int rows_here = int(rows - t * kGemmRows < kGemmRows ? rows - t * kGemmRows : kGemmRows);
      int8_gemm_tile(workspace + t * pairs * kGemmRows, packed_w + panel * pairs * kGemmCols, pairs, rows_here, cols,
                     sums + t * kGemmRows * n + panel * kGemmCols, n);
    }
  }
}

}  // namespace
