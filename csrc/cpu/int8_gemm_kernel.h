// An exact int8 GEMM for x86 CPUs without an int8 dot-product instruction (no VNNI, no AMX). There
// oneDNN's int8 GEMM multiplies u8 x s8 pairs whose sums saturate at int16 and runs ~25x slower
// than an fp32 GEMM. Here the int8 values are widened to int16 and multiplied with pmaddwd, which
// sums two int16 products into each int32 lane: 2 x lanes multiply-adds an instruction, twice an
// fp32 FMA's. Exact: a pair sums to at most 2 x 128^2 (< 2^31), and a row to K x 128^2, within
// int32 for the K <= 2^17 that prepare_int8_linear allows.
//
// Layouts, by pairs of K (k even, k odd; an odd K is padded with 0):
//   weight, packed once (per weight, or else per call) as int8: panels of kGemmCols output columns,
//   [k / 2][kGemmCols][2] each, widened to int16 as it is loaded (one pmovsxbw with a memory
//   operand, so the packed weight is no larger than the weight itself);
//   activations, packed per row chunk as int32 words of two int16: tiles of kGemmRows rows,
//   [k / 2][kGemmRows] each, a word broadcast per row.
// A register tile of kGemmRows x kGemmCols int32 sums runs over the whole K, reading its weight
// panel (K x kGemmCols bytes, 12 KB at K = 768 with AVX2) from L1 for every tile of the chunk.
// Included by the x86 isa_*.cpp builds (SSE2, AVX2, AVX-512BW pmaddwd), after vec.h and
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

// 8 rows of 8 int8 pairs (16 bytes each, row stride src_stride bytes) transposed: vector j of dst
// (stride dst_stride bytes) holds pair j of the 8 rows. Three rounds of SSE2 unpacks.
inline void transpose_8x8_pairs(const int8_t* src, int64_t src_stride, int8_t* dst, int64_t dst_stride) {
  __m128i r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * src_stride));
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);      // pairs 0-3 of rows 2i, 2i + 1
    a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);  // pairs 4-7
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 2; ++i) {
      b[4 * h + 2 * i] = _mm_unpacklo_epi32(a[4 * h + i], a[4 * h + i + 2]);
      b[4 * h + 2 * i + 1] = _mm_unpackhi_epi32(a[4 * h + i], a[4 * h + i + 2]);
    }
  // b[0..3]: pairs (0, 1), (2, 3), (4, 5), (6, 7) of rows 0-3; b[4..7] the same of rows 4-7.
  for (int j = 0; j < 4; ++j) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j) * dst_stride), _mm_unpacklo_epi64(b[j], b[j + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j + 1) * dst_stride), _mm_unpackhi_epi64(b[j], b[j + 4]));
  }
}

// Panels [panel_begin, panel_end) of w ([n, k] int8, row-major) into packed: 8 columns x 8 pairs
// at a time by transposes, the rest (the last pairs, an odd K, columns past n) one pair at a time.
void int8_gemm_pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t panel_begin, int64_t panel_end,
                           int8_t* packed) {
  const int64_t pairs = (k + 1) / 2;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    int8_t* out = packed + panel * pairs * kGemmCols * 2;
    for (int c0 = 0; c0 < kGemmCols; c0 += 8) {
      const int64_t col0 = panel * kGemmCols + c0;
      int64_t p0 = 0;
      if (col0 + 8 <= n)
        for (; p0 + 8 <= k / 2; p0 += 8)
          transpose_8x8_pairs(w + col0 * k + 2 * p0, k, out + (p0 * kGemmCols + c0) * 2, kGemmCols * 2);
      for (int c = c0; c < c0 + 8; ++c) {
        const int64_t col = panel * kGemmCols + c;
        for (int64_t p = p0; p < pairs; ++p) {
          int8_t* dst = out + (p * kGemmCols + c) * 2;
          dst[0] = col < n ? w[col * k + 2 * p] : 0;
          dst[1] = col < n && 2 * p + 1 < k ? w[col * k + 2 * p + 1] : 0;
        }
      }
    }
  }
}

// 2 x kLanes int8 (kLanes pairs) widened to int16, as the int16 pairs of kLanes int32 words.
inline vint load_widened_pairs(const int8_t* p) {
#if MBK_LANES == 16
  return (vint)_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif MBK_LANES == 8
  return (vint)_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else  // SSE2 has no pmovsxbw: each byte into the high half of a word, then shifted down with its sign
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vint)_mm_srai_epi16(_mm_unpacklo_epi8(bytes, bytes), 8);
#endif
}

// One register tile: sums[r][c] = row r of a_tile . column c of w_panel, over `pairs` int16 pairs;
// the first `rows` x `cols` of it stored to c (row stride ldc).
inline void int8_gemm_tile(const int32_t* a_tile, const int8_t* w_panel, int64_t pairs, int rows, int cols,
                           int32_t* c, int64_t ldc) {
  vint sums[kGemmRows][2];
#pragma GCC unroll 16
  for (int r = 0; r < kGemmRows; ++r) sums[r][0] = sums[r][1] = vint{};
  for (int64_t p = 0; p < pairs; ++p) {
    const vint w0 = load_widened_pairs(w_panel + p * kGemmCols * 2);
    const vint w1 = load_widened_pairs(w_panel + (p * kGemmCols + kLanes) * 2);
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

// The activations of `rows` rows as int16 pairs, in whole register tiles.
int64_t int8_gemm_workspace_ints(int64_t rows, int64_t k) {
  return (rows + kGemmRows - 1) / kGemmRows * kGemmRows * ((k + 1) / 2);
}

// sums ([rows, n] int32, row-major) = x ([rows, k] int8, row-major) . w^T, w packed by
// int8_gemm_pack_weight; workspace holds int8_gemm_workspace_ints(rows, k) ints.
void int8_gemm_rows(const int8_t* x, int64_t rows, int64_t k, const int8_t* packed_w, int64_t n, int32_t* sums,
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
      int8_gemm_tile(workspace + t * pairs * kGemmRows, packed_w + panel * pairs * kGemmCols * 2, pairs, rows_here,
                     cols, sums + t * kGemmRows * n + panel * kGemmCols, n);
    }
  }
}

}  // namespace
