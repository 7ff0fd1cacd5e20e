// The int8 GEMM of CPUs with AMX-INT8 (Sapphire Rapids and later): tdpbssd multiplies a 16 x 64
// int8 tile by a 64 x 16 one into 16 x 16 int32 sums, 16384 multiply-adds an instruction, exact
// (each product and sum in int32; a row sums K x 127^2, within int32 for the K <= 2^17 that
// prepare_int8_linear allows). oneDNN's AMX int8 matmul through aten::_int_mm reorders the weight
// on every call of every row chunk; here the weight is packed once (per weight, or else per call),
// and the op's schedule (int8_linear_op.cpp) keeps each thread's share of it in its L2.
//
// Layouts. A tile row holds 64 bytes of K: 64 int8 of one activation row, read in place from x
// ([rows, k], row-major) when K is a multiple of 64, from a zero-padded copy otherwise. The weight
// ([n, k] int8) is packed in panels of 32 output columns, each two halves (columns 0-15 and 16-31)
// whose K blocks of 64 are contiguous B tiles of 16 rows: row q holds K values 4q..4q+3 of each of
// the 16 columns, [16][4] bytes, as tdpbssd reads them. K and the columns past n are padded with
// zeros. A panel is read as two streams side by side, each prefetched 4 KB ahead on its first
// row block, as the streamed fp32 GEMM reads its weight (streamed_gemm_kernel.h): the int8
// encoder's 16-token query went from 11.5 to 10.8 ms (NOTES "A GEMM that streams its weight").
//
// A register block is 32 rows x 32 columns: four C tiles, two A tiles, two B tiles (the eight tile
// registers), so each tile loaded feeds two tdpbssd; a block of at most 16 rows uses one A tile.
//
// Included by isa_amx.cpp, after amx.h; runs only where dispatch.cpp found that the CPU has
// AMX-INT8 and the kernel let this process use the tile registers.
#pragma once

namespace {

inline int64_t amx_round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

constexpr int kAmxPanelCols = 32;     // two B tiles of 16 columns
constexpr int kAmxBlockRows = 32;     // two A tiles of 16 rows
constexpr int kAmxBlockK = 64;        // bytes (int8 values) of K per tile row
constexpr int kAmxTileBytes = 1024;  // 16 rows of 64 bytes
constexpr int64_t kAmxPanelBlockBytes = 2 * kAmxTileBytes;

// One K block of 16 columns: column c's 64 bytes at src + c * k, as 16 rows of [16 columns][4 bytes].
// Each output row gathers one 4-byte word from each column.
inline void amx_pack_full_tile(const int8_t* src, int64_t k, int8_t* out) {
  const __m512i column_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                      14, 15), _mm512_set1_epi32(int(k)));
  for (int q = 0; q < 16; ++q) {
    // The masked form: GCC 12's unmasked one reads an uninitialized source (-Wmaybe-uninitialized).
    const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), 0xffff, column_offsets, src + 4 * q, 1);
    _mm512_storeu_si512(out + q * 64, words);
  }
}

// Panels [panel_begin, panel_end) of w into packed (int8_gemm_packed_weight_bytes bytes).
void amx_int8_gemm_pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t panel_begin, int64_t panel_end,
                               int8_t* packed) {
  const int64_t blocks = amx_round_up(k, kAmxBlockK) / kAmxBlockK;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel)
    for (int64_t b = 0; b < blocks; ++b)
      for (int half = 0; half < 2; ++half) {
        int8_t* out = packed + panel * blocks * kAmxPanelBlockBytes + (half * blocks + b) * kAmxTileBytes;
        const int64_t col0 = panel * kAmxPanelCols + half * 16, k0 = b * kAmxBlockK;
        // The gather's offsets, up to 15 * k with k <= 2^17 (prepare_int8_linear), fit its int32.
        if (col0 + 16 <= n && k0 + kAmxBlockK <= k) {
          amx_pack_full_tile(w + col0 * k + k0, k, out);
          continue;
        }
        for (int q = 0; q < 16; ++q)
          for (int c = 0; c < 16; ++c)
            for (int j = 0; j < 4; ++j) {
              const int64_t col = col0 + c, kk = k0 + 4 * q + j;
              out[q * 64 + c * 4 + j] = col < n && kk < k ? w[col * k + kk] : 0;
            }
      }
}

int64_t amx_int8_gemm_workspace_ints(int64_t rows, int64_t k) {
  // A zero-padded copy of the rows (all of them when K is not a multiple of 64, else the last
  // partial block), then one 32 x 32 block of sums for partial blocks.
  return amx_round_up(rows, kAmxBlockRows) * amx_round_up(k, kAmxBlockK) / 4 + kAmxBlockRows * kAmxPanelCols;
}

// sums ([rows, n] int32, row-major) = x ([rows, k] int8, row-major) . w^T, w packed by
// amx_int8_gemm_pack_weight.
void amx_int8_gemm_rows(const int8_t* x, int64_t rows, int64_t k, const int8_t* packed_w, int64_t n, int32_t* sums,
                        int32_t* workspace) {
  const int64_t k_padded = amx_round_up(k, kAmxBlockK), blocks = k_padded / kAmxBlockK;
  const int64_t row_blocks = (rows + kAmxBlockRows - 1) / kAmxBlockRows;
  const int64_t panels = modernbert_kernels::cpu::int8_gemm_panels(n, kAmxPanelCols);
  auto* a_copy = reinterpret_cast<int8_t*>(workspace);
  int32_t* partial = workspace + amx_round_up(rows, kAmxBlockRows) * k_padded / 4;
  // Row blocks read from a_copy start at copy_from (all of them, or only a last partial one).
  const int64_t copy_from = k % kAmxBlockK ? 0 : rows / kAmxBlockRows * kAmxBlockRows;
  for (int64_t r = copy_from; r < row_blocks * kAmxBlockRows; ++r) {
    int8_t* dst = a_copy + (r - copy_from) * k_padded;
    if (r < rows) {
      std::memcpy(dst, x + r * k, k);
      std::memset(dst + k, 0, k_padded - k);
    } else {
      std::memset(dst, 0, k_padded);
    }
  }
  amx_configure_tiles();
  for (int64_t panel = 0; panel < panels; ++panel) {
    const int8_t* b0 = packed_w + panel * blocks * kAmxPanelBlockBytes;
    const int8_t* b1 = b0 + blocks * kAmxTileBytes;
    const int64_t cols = n - panel * kAmxPanelCols < kAmxPanelCols ? n - panel * kAmxPanelCols : kAmxPanelCols;
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t row0 = rb * kAmxBlockRows;
      const int64_t rows_here = rows - row0 < kAmxBlockRows ? rows - row0 : kAmxBlockRows;
      const bool copied = row0 >= copy_from;
      const int8_t* a = copied ? a_copy + (row0 - copy_from) * k_padded : x + row0 * k;
      const int64_t lda = copied ? k_padded : k;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const bool one_row_tile = rows_here <= 16;
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int8_t* t0 = b0 + kb * kAmxTileBytes;
        const int8_t* t1 = b1 + kb * kAmxTileBytes;
        if (rb == 0)
          for (int line = 0; line < kAmxTileBytes; line += 64) {
            __builtin_prefetch(t0 + modernbert_kernels::cpu::kWeightPrefetchBytes + line, 0, 3);
            __builtin_prefetch(t1 + modernbert_kernels::cpu::kWeightPrefetchBytes + line, 0, 3);
          }
        _tile_loadd(4, a + kb * kAmxBlockK, lda);
        _tile_loadd(6, t0, 64);
        _tile_loadd(7, t1, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        if (one_row_tile) continue;
        _tile_loadd(5, a + 16 * lda + kb * kAmxBlockK, lda);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      int32_t* c = sums + row0 * n + panel * kAmxPanelCols;
      if (rows_here == kAmxBlockRows && cols == kAmxPanelCols) {
        _tile_stored(0, c, n * 4);
        _tile_stored(1, c + 16, n * 4);
        _tile_stored(2, c + 16 * n, n * 4);
        _tile_stored(3, c + 16 * n + 16, n * 4);
        continue;
      }
      _tile_stored(0, partial, kAmxPanelCols * 4);
      _tile_stored(1, partial + 16, kAmxPanelCols * 4);
      _tile_stored(2, partial + 16 * kAmxPanelCols, kAmxPanelCols * 4);
      _tile_stored(3, partial + 16 * kAmxPanelCols + 16, kAmxPanelCols * 4);
      for (int64_t r = 0; r < rows_here; ++r) std::memcpy(c + r * n, partial + r * kAmxPanelCols, cols * 4);
    }
  }
  _tile_release();
}

}  // namespace
