// Block-sparse attention forward on the CPU, one work item = (batch, head, query block).
//
// For every key block the layout row visits, the key block is packed transposed (head_dim x keys)
// so that scores come from an outer-product microkernel (4 query rows x 4 vectors of keys in
// registers, 3 in the AVX2 build; broadcasting q); probabilities then multiply V rows the same
// way. Online softmax in fp32, log2 domain (q is pre-scaled by scale * log2(e)). With a window,
// each 4-row tile only computes the key columns its window reaches, so the work tracks the ideal
// FLOP count rather than whole tiles. Included by the isa_*.cpp builds.
#pragma once

#include "kernels.h"
#include "rows.h"

namespace {

constexpr int kRowTile = modernbert_kernels::cpu::kAttentionRowTile;  // query rows per microkernel call
// Vectors of keys per score microkernel call, and of head_dim per P V call. AVX2 has 16 registers:
// 4 x 4 accumulators, 4 loaded vectors and a broadcast spilled there, and 4 x 3 (16 registers in all)
// ran 1.35-1.5x faster (NOTES "The AVX2 build's microkernel"). SSE2 measured best at 4.
constexpr int kKeyVectors = MBK_LANES == 8 ? 3 : 4;
constexpr int kOutVectors = kKeyVectors;
constexpr int kRowStride = modernbert_kernels::kMaxBlockSize;  // floats per score row

using modernbert_kernels::AttentionParams;
using modernbert_kernels::Band;
using modernbert_kernels::kMaxBlockSize;
using modernbert_kernels::kMaxHeadDim;

// A few packed blocks kept per call, least recently used evicted: consecutive work items of one
// head share most of their blocks (a window visits blocks m - 1, m, m + 1).
struct BlockCache {
  int slots;
  int64_t tags[modernbert_kernels::cpu::kMaxCacheSlots];
  int64_t last_use[modernbert_kernels::cpu::kMaxCacheSlots];
  int64_t clock = 0;
  explicit BlockCache(int count) : slots(count) {
    for (int s = 0; s < slots; ++s) tags[s] = -1, last_use[s] = 0;
  }
  bool contains(int64_t tag) const {
    for (int s = 0; s < slots; ++s)
      if (tags[s] == tag) return true;
    return false;
  }
  // The slot holding tag; sets *hit, or picks the least recently used slot for it.
  int find(int64_t tag, bool* hit) {
    int slot = 0;
    for (int s = 0; s < slots; ++s) {
      if (tags[s] == tag) {
        slot = s;
        break;
      }
      if (last_use[s] < last_use[slot]) slot = s;
    }
    *hit = tags[slot] == tag;
    tags[slot] = tag;
    last_use[slot] = ++clock;
    return slot;
  }
};

// Rows of q, k and v lie a packed qkv row apart (4.5 KiB in the base encoder), a stride the
// hardware prefetcher does not follow: every row the kernel reads first waited on DRAM (a quarter
// of the bf16 kernel's time at 8 x 512, in a profile). So the rows needed next (the next item's
// queries, the next key block's keys and values) are queued here, and each row tile issues the
// prefetches of a few of them: spread over the current block's compute, never a burst that would
// fill the core's miss buffers.
class RowPrefetcher {
 public:
  // Queues `rows` rows of `row_bytes` each, the first at `first`, `step` bytes apart.
  void add(const void* first, int64_t step, int rows, int row_bytes) {
    if (rows <= 0) return;
    if (count_ == kRanges) issue(kRanges * kMaxBlockSize);  // full: issue everything queued at once
    ranges_[(head_ + count_++) % kRanges] = {static_cast<const char*>(first), step, rows, row_bytes};
  }
  // Issues the prefetches of up to `rows` queued rows, oldest first.
  void issue(int rows) {
    while (rows > 0 && count_ > 0) {
      Range& range = ranges_[head_];
      for (; rows > 0 && range.rows > 0; --rows, --range.rows, range.next += range.step) {
        for (int b = 0; b < range.row_bytes; b += 64) __builtin_prefetch(range.next + b);
        __builtin_prefetch(range.next + range.row_bytes - 1);  // a row need not start a cache line
      }
      if (range.rows == 0) head_ = (head_ + 1) % kRanges, --count_;
    }
  }

 private:
  static constexpr int kRanges = 4;
  struct Range {
    const char* next;
    int64_t step;
    int rows, row_bytes;
  };
  Range ranges_[kRanges];
  int head_ = 0, count_ = 0;
};

// The kLanes-aligned columns [*begin, *end) of a block starting at token block_start (padded to
// `padded` columns) that some row of the tile [first, first + kRowTile) sees through the band;
// false when there are none.
inline bool visible_columns(int64_t first, int64_t block_start, int padded, const Band& band, int* begin, int* end) {
  *begin = 0;
  *end = padded;
  if (band.on) {
    const int64_t lo = first - band.below - block_start, hi = first + kRowTile - 1 + band.above - block_start + 1;
    if (lo > 0) *begin = static_cast<int>(lo < padded ? lo : padded) / kLanes * kLanes;
    if (hi < padded) *end = hi <= 0 ? 0 : static_cast<int>((hi + kLanes - 1) / kLanes * kLanes);
    if (*end > padded) *end = padded;
  }
  return *begin < *end;
}

// kt[d * kt_stride + j] = rows[j * row_stride + d] for d < head_dim and j < padded (zeros from
// `keys` on): a block of key rows transposed for the score microkernel, kLanes x kLanes tiles at a
// time through registers (a scalar copy was a sixth of the windowed kernel's time).
inline void transpose_rows(const float* rows, int64_t row_stride, int keys, int padded, int head_dim, float* kt,
                           int kt_stride) {
  for (int j = 0; j < padded; j += kLanes) {
    for (int d = 0; d < head_dim; d += kLanes) {
      vfloat tile[kLanes];
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i) tile[i] = j + i < keys ? load(rows + (j + i) * row_stride + d) : splat(0.f);
      transpose_tile(tile);
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i) store(kt + (d + i) * kt_stride + j, tile[i]);
    }
  }
}

// pairs[d] = even[d] | odd[d] << 16 for d < n (a multiple of kLanes): two rows of bf16 values
// interleaved into the pairs vdpbf16ps and tdpbf16ps read; a null row reads as zeros.
inline void interleave_rows(const uint16_t* even, const uint16_t* odd, int n, uint32_t* pairs) {
  for (int d = 0; d < n; d += kLanes) {
    const vuint lo = even ? __builtin_convertvector(*reinterpret_cast<const vbf16_u*>(even + d), vuint) : vuint{};
    const vuint hi = odd ? __builtin_convertvector(*reinterpret_cast<const vbf16_u*>(odd + d), vuint) : vuint{};
    *reinterpret_cast<vuint_u*>(pairs + d) = lo | hi << 16;
  }
}

// One work item: the block-th block of rows (queries, or keys in the dk/dv pass) of one
// (batch, head), with where its sequence lies.
struct WorkItem {
  int64_t block, head, batch, seq_start, seq_len;
  int64_t i0;            // the item's first row
  int rows, padded_rows;  // rows in the block (the last may be short), rounded up to kRowTile

  WorkItem(const AttentionParams& a, int64_t item, int64_t num_blocks)
      : block(item % num_blocks), head((item / num_blocks) % a.heads), batch(item / (num_blocks * a.heads)) {
    seq_start = a.cu_seqlens ? a.cu_seqlens[batch] : 0;
    seq_len = a.cu_seqlens ? a.cu_seqlens[batch + 1] - seq_start : a.seq_len;
    i0 = block * a.block_size;
    const int64_t left = seq_len - i0;
    rows = left <= 0 ? 0 : static_cast<int>(left < a.block_size ? left : a.block_size);
    padded_rows = (rows + kRowTile - 1) / kRowTile * kRowTile;
  }
  bool empty() const { return rows == 0; }
  // Element offset of token t of this sequence in a tensor with (batch, head, token) strides.
  int64_t offset(const AttentionParams& a, const int64_t* stride, int64_t t) const {
    return (a.cu_seqlens ? 0 : batch * stride[0]) + head * stride[1] + (seq_start + t) * stride[2];
  }
  // Index of token t's entry in lse (and delta).
  int64_t stat(const AttentionParams& a, int64_t t) const {
    return (a.cu_seqlens ? 0 : batch * a.lse_stride[0]) + head * a.lse_stride[1] + seq_start + t;
  }
  // Queues rows [first, first + count) of a (batch, head, token) strided tensor, clipped to the sequence.
  void prefetch(const AttentionParams& a, RowPrefetcher& prefetcher, const void* data, const int64_t* stride,
                int64_t first, int64_t count) const {
    const int element = a.dtype == ElementType::Float32 ? 4 : 2;
    const int64_t rows = (first + count < seq_len ? first + count : seq_len) - first;
    prefetcher.add(static_cast<const char*>(data) + offset(a, stride, first) * element, stride[2] * element,
                   static_cast<int>(rows), static_cast<int>(a.head_dim) * element);
  }
  bool key_is_real(const AttentionParams& a, int64_t t) const {
    return t < seq_len && (a.key_padding == nullptr || a.key_padding[batch * a.seq_len + t]);
  }
};

// acc[r][c] += sum_{i < n} a[r * a_row + i] * b[i * b_step + c * kLanes] for kRowTile rows and
// Vectors vectors: the outer-product step both products of attention are made of (a scalar of each
// row broadcast against vectors of one row of b), accumulators in registers.
template <int Vectors>
inline void outer_product_microkernel(const float* a, ptrdiff_t a_row, const float* b, ptrdiff_t b_step, int n,
                                      vfloat (&acc)[kRowTile][Vectors]) {
  const float* b_row = b;
  for (const float *ai = a, *a_end = a + n; ai != a_end; ++ai, b_row += b_step) {
    vfloat columns[Vectors];
#pragma GCC unroll 4
    for (int c = 0; c < Vectors; ++c) columns[c] = load(b_row + c * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < kRowTile; ++r) {
      vfloat scalar = splat(ai[r * a_row]);
#pragma GCC unroll 4
      for (int c = 0; c < Vectors; ++c) acc[r][c] += scalar * columns[c];
    }
  }
}

// Logit soft-capping of scores in log2 units (the kernels' domain: s = log2(e) x for a score x):
// log2(e) softcap tanh(x / softcap) = bound * tanh(s / bound), bound = log2(e) softcap. With
// e = 2^(-2 |s| / softcap) = exp(-2 |x| / softcap) in (0, 1], tanh = sign(s) (1 - e) / (1 + e):
// no overflow, and NaN stays NaN.
struct SoftCap {
  float bound = 0.f;          // 0: off
  float exponent = 0.f;       // -2 / softcap
  float inverse_bound = 0.f;  // 1 / bound

  explicit SoftCap(float softcap)
      : bound(softcap * 1.4426950408889634f),
        exponent(softcap > 0.f ? -2.f / softcap : 0.f),
        inverse_bound(softcap > 0.f ? 1.f / (softcap * 1.4426950408889634f) : 0.f) {}
  bool on() const { return bound > 0.f; }
  vfloat tanh(vfloat s) const {
    const vfloat e = vexp2(vabs(s) * exponent);
    const vfloat t = (splat(1.f) - e) / (splat(1.f) + e);
    // Near 0, 1 - e cancels: an absolute error of ~6e-8, which the cap multiplies, so scores far
    // below a large cap would lose their digits. There, the odd series to x^7 (below 2e-9 relative).
    const vfloat x = s * inverse_bound, x2 = x * x;
    const vfloat series =
        x * (splat(1.f) + x2 * (splat(-1.f / 3.f) + x2 * (splat(2.f / 15.f) + x2 * splat(-17.f / 315.f))));
    return select(vabs(x) < 0.125f, series, select(s < 0.f, -t, t));
  }
};

// How a score tile leaves the microkernel's registers: scaled (bf16; fp32 q comes pre-scaled),
// soft-capped where asked, -inf on masked keys and on columns outside the band, stored, and folded
// into each row's running max. Masking and the max in memory would be one more pass over the scores.
struct ScoreStore {
  float* scores;          // [kRowTile][kRowStride]
  const float* key_bias;  // 0 or -inf per column of the block; null when every key is real
  const Band& band;
  int64_t diagonal;  // key - query at row 0, column 0 (j0 - first)
  float scale;
  const SoftCap& softcap;
  vfloat max[kRowTile];

  ScoreStore(float* scores, const float* key_bias, const Band& band, int64_t diagonal, float scale,
             const SoftCap& softcap)
      : scores(scores), key_bias(key_bias), band(band), diagonal(diagonal), scale(scale), softcap(softcap) {
    for (int r = 0; r < kRowTile; ++r) max[r] = splat(-__builtin_inff());
  }

  // Columns [j, j + Vectors * kLanes).
  template <int Vectors>
  void operator()(vfloat (&acc)[kRowTile][Vectors], int j) {
    // Locals: the score stores may alias the members (floats), which would be reloaded after each.
    const vfloat minus_inf = splat(-__builtin_inff()), scale_v = splat(scale);
    const float* bias = key_bias;
    float* out = scores;
    const bool banded = band.on, capped = softcap.on();
    const vfloat bound = splat(softcap.bound);
    const int64_t below = band.below, above = band.above, first_diagonal = diagonal + j;
    vfloat row_max[kRowTile];
    for (int r = 0; r < kRowTile; ++r) row_max[r] = max[r];
    // Unrolled, so that acc stays in registers (indexed by a loop variable, it would live in memory).
#pragma GCC unroll 4
    for (int c = 0; c < Vectors; ++c) {
      const int column = j + c * kLanes;
      // Masked keys are replaced, not offset: a NaN key that no query sees stays unseen.
      const vint real = bias ? load(bias + column) == 0.f : vint{} == 0;
#pragma GCC unroll 4
      for (int r = 0; r < kRowTile; ++r) {
        vfloat s = acc[r][c] * scale_v;
        if (capped) s = bound * softcap.tanh(s);  // before the masks: tanh(-inf) would be -1
        if (bias) s = select(real, s, minus_inf);
        // key - query at this vector's first lane; only vectors that cross the band's edges are masked
        const int64_t lo = first_diagonal + c * kLanes - r;
        if (banded && (lo < -below || lo + kLanes - 1 > above)) {
          const vint distance = iota() + static_cast<int>(lo);
          s = select((distance >= -static_cast<int>(below)) & (distance <= static_cast<int>(above)), s, minus_inf);
        }
        store(out + r * kRowStride + column, s);
        row_max[r] = vmax(row_max[r], s);
      }
    }
    for (int r = 0; r < kRowTile; ++r) max[r] = row_max[r];
  }
};

// The backward's store: the tile as it is, rows kRowStride apart.
struct PlainScoreStore {
  float* scores;
  template <int Vectors>
  void operator()(vfloat (&acc)[kRowTile][Vectors], int j) {
    for (int r = 0; r < kRowTile; ++r)
      for (int c = 0; c < Vectors; ++c) store(scores + r * kRowStride + j + c * kLanes, acc[r][c]);
  }
};

// f(VectorCount<n>{}, j) over the columns [j_begin, j_end) (multiples of kLanes): kKeyVectors
// vectors at a time, then the 1-3 left.
template <typename F>
inline void for_key_vectors(int j_begin, int j_end, F&& f) {
  int j = j_begin;
  for (; j + kKeyVectors * kLanes <= j_end; j += kKeyVectors * kLanes) f(VectorCount<kKeyVectors>{}, j);
  with_tail_vectors((j_end - j) / kLanes, [&](auto vectors) { f(vectors, j); });
}

// scores[r][j] = sum_d q[r][d] * kt[d][j] for kRowTile rows and Vectors vectors of columns from j,
// handed to `out`. q rows are head_dim apart; kt rows kt_stride apart.
template <int Vectors, typename Store>
inline void score_microkernel(const float* q, const float* kt, int kt_stride, int head_dim, int j, Store& out) {
  vfloat acc[kRowTile][Vectors] = {};
  outer_product_microkernel<Vectors>(q, head_dim, kt + j, kt_stride, head_dim, acc);
  out(acc, j);
}

// Scores for columns [j_begin, j_end) (multiples of kLanes), kKeyVectors vectors at a time.
template <typename Store>
inline void score_tile(const float* q, const float* kt, int kt_stride, int head_dim, int j_begin, int j_end,
                       Store& out) {
  for_key_vectors(j_begin, j_end, [&](auto vectors, int j) {
    score_microkernel<decltype(vectors)::value>(q, kt, kt_stride, head_dim, j, out);
  });
}

// p = 2^(s - max) over a score row's columns [j_begin, j_end) (multiples of kLanes), in place.
// Returns the sum of p: NaN when a score was NaN.
inline float exponentiate(float* row, int j_begin, int j_end, float max) {
  vfloat sum = splat(0.f);
  for (int j = j_begin; j < j_end; j += kLanes) {
    const vfloat p = vexp2(load(row + j) - max);
    store(row + j, p);
    sum += p;
  }
  return reduce_sum(sum);
}

// out[r] = out[r] * rescale[r] + sum_{j in [j_begin, j_end)} probs[r][j] * v[j] for kRowTile rows.
template <int Vectors>
inline void accumulate_microkernel(const float* probs, const float* v, int64_t v_stride, int head_dim, int j_begin,
                                   int j_end, const float* rescale, float* out) {
  vfloat acc[kRowTile][Vectors];
  for (int r = 0; r < kRowTile; ++r)
    for (int c = 0; c < Vectors; ++c) acc[r][c] = load(out + r * head_dim + c * kLanes) * rescale[r];
  outer_product_microkernel<Vectors>(probs + j_begin, kRowStride, v + j_begin * v_stride, v_stride, j_end - j_begin,
                                     acc);
  for (int r = 0; r < kRowTile; ++r)
    for (int c = 0; c < Vectors; ++c) store(out + r * head_dim + c * kLanes, acc[r][c]);
}

inline void accumulate_tile(const float* probs, const float* v, int64_t v_stride, int head_dim, int j_begin,
                            int j_end, const float* rescale, float* out) {
  int d = 0;
  for (; d + kOutVectors * kLanes <= head_dim; d += kOutVectors * kLanes)
    accumulate_microkernel<kOutVectors>(probs, v + d, v_stride, head_dim, j_begin, j_end, rescale, out + d);
  // head_dim 32 with 16 lanes: two vectors
  with_tail_vectors((head_dim - d) / kLanes, [&](auto vectors) {
    accumulate_microkernel<decltype(vectors)::value>(probs, v + d, v_stride, head_dim, j_begin, j_end, rescale,
                                                     out + d);
  });
}

#ifdef MBK_BF16_DOT
// bf16 inputs where the CPU has AVX512-BF16 (the avx512_bf16 build): both products as dot
// products of bf16 pairs (vdpbf16ps: two multiply-adds per fp32 lane, fp32 accumulation), half
// the instructions of the fp32 microkernels. Operands are packed as pairs along the reduction
// axis: q and k rows as they are (head_dim pairs are adjacent), kpack[p][j] = (k[j][2p],
// k[j][2p + 1]); probabilities rounded to bf16 pairs (p[2i], p[2i + 1]); vpack[i][d] = (v[2i][d],
// v[2i + 1][d]).
constexpr bool kBf16Dot = true;

// acc[r][c] += sum_{i < n} pair(a[r * a_row + i]) . pair(b[i * b_step + c * kLanes + lane]).
template <int Vectors>
inline void pair_outer_product(const uint32_t* a, ptrdiff_t a_row, const uint32_t* b, ptrdiff_t b_step, int n,
                               vfloat (&acc)[kRowTile][Vectors]) {
  for (int i = 0; i < n; ++i, b += b_step) {
    __m512bh columns[Vectors];
#pragma GCC unroll 4
    for (int c = 0; c < Vectors; ++c) columns[c] = (__m512bh)_mm512_loadu_si512(b + c * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < kRowTile; ++r) {
      const __m512bh scalar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_row + i]));
#pragma GCC unroll 4
      for (int c = 0; c < Vectors; ++c) acc[r][c] = (vfloat)_mm512_dpbf16_ps((__m512)acc[r][c], scalar, columns[c]);
    }
  }
}

template <int Vectors>
inline void score_microkernel_bf16(const uint32_t* q_pairs, const uint32_t* k_pairs, int bs, int head_dim, int j,
                                   ScoreStore& out) {
  vfloat acc[kRowTile][Vectors] = {};
  pair_outer_product<Vectors>(q_pairs, head_dim / 2, k_pairs + j, bs, head_dim / 2, acc);
  out(acc, j);
}

inline void score_tile_bf16(const uint32_t* q_pairs, const uint32_t* k_pairs, int bs, int head_dim, int j_begin,
                            int j_end, ScoreStore& out) {
  for_key_vectors(j_begin, j_end, [&](auto vectors, int j) {
    score_microkernel_bf16<decltype(vectors)::value>(q_pairs, k_pairs, bs, head_dim, j, out);
  });
}

// p = 2^(s - max) over a score row's columns [j_begin, j_end) (multiples of kLanes), written as
// bf16 pairs at pair index j / 2, in place (each step reads its 32 floats before it writes their
// 16 pairs below them). Returns the sum of the fp32 p: NaN when a score was NaN.
inline float exponentiate_to_pairs(float* row, int j_begin, int j_end, float max) {
  uint32_t* pairs = reinterpret_cast<uint32_t*>(row);
  vfloat sum = splat(0.f);
  for (int j = j_begin; j < j_end; j += 2 * kLanes) {
    const bool full = j + kLanes < j_end;
    const vfloat low = vexp2(load(row + j) - max);
    const vfloat high = full ? vexp2(load(row + j + kLanes) - max) : splat(0.f);
    sum += low + high;
    const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh((__m512)high, (__m512)low);
    _mm512_mask_storeu_epi32(pairs + j / 2, full ? 0xFFFF : 0x00FF, packed);
  }
  return reduce_sum(sum);
}

template <int Vectors>
inline void accumulate_microkernel_bf16(const uint32_t* prob_pairs, const uint32_t* v_pairs, int head_dim,
                                        int i_begin, int i_end, const float* rescale, float* out) {
  vfloat acc[kRowTile][Vectors];
  for (int r = 0; r < kRowTile; ++r)
    for (int c = 0; c < Vectors; ++c) acc[r][c] = load(out + r * head_dim + c * kLanes) * rescale[r];
  // Each row's pairs sit at the start of its own score row (kRowStride floats apart).
  pair_outer_product<Vectors>(prob_pairs + i_begin, kRowStride, v_pairs + i_begin * head_dim, head_dim,
                              i_end - i_begin, acc);
  for (int r = 0; r < kRowTile; ++r)
    for (int c = 0; c < Vectors; ++c) store(out + r * head_dim + c * kLanes, acc[r][c]);
}

// out[r] = out[r] * rescale[r] + the pairs [i_begin, i_end) of probabilities times value rows.
inline void accumulate_tile_bf16(const uint32_t* prob_pairs, const uint32_t* v_pairs, int head_dim, int i_begin,
                                 int i_end, const float* rescale, float* out) {
  int d = 0;
  for (; d + kOutVectors * kLanes <= head_dim; d += kOutVectors * kLanes)
    accumulate_microkernel_bf16<kOutVectors>(prob_pairs, v_pairs + d, head_dim, i_begin, i_end, rescale, out + d);
  with_tail_vectors((head_dim - d) / kLanes, [&](auto vectors) {
    accumulate_microkernel_bf16<decltype(vectors)::value>(prob_pairs, v_pairs + d, head_dim, i_begin, i_end, rescale,
                                                          out + d);
  });
}
#else
constexpr bool kBf16Dot = false;
#endif

#ifdef MBK_AMX_TILES
// bf16 inputs where the CPU has AMX-BF16 (the amx build): both products on tiles, for 16 query rows
// at a time. The operands are the bf16 pairs above, as they lie: q pairs as A tiles (16 rows x 16
// pairs), the keys' pairs [head_dim / 2][bs] as B tiles (16 pairs x 16 keys); then the
// probabilities' pairs (at the start of each score row) as A tiles and the values' pairs
// [keys / 2][head_dim] as B tiles (16 key pairs x 16 columns). tdpbf16ps sums in fp32. Masking, the
// online softmax and the rounding of probabilities stay the vector code's; the tiles take the
// products, which the vdpbf16ps microkernels computed 4 rows at a time. Needs head_dim a multiple
// of 32 (whole A tiles of q) and blocks a multiple of 16 (whole tiles of rows).
constexpr bool kAmxTiles = true;
constexpr int kAmxRows = 16;

// out[r][c] = sum over `steps` steps of 16 pairs of a's pairs (16 rows, a_stride pairs apart; step
// s at a + 16 s) times b's (rows of 16 x `tiles` columns, b_stride pairs apart; step s at
// b + 16 s b_stride), for 16 rows and 16 x `tiles` columns (tiles <= 4, one C tile each); out rows
// are out_stride floats apart. Both attention products are this: scores (q pairs by the keys'
// pairs) and P V (probability pairs by the values' pairs).
inline void amx_bf16_product(const uint32_t* a, int a_stride, const uint32_t* b, int b_stride, int steps, int tiles,
                             float* out, int out_stride) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int s = 0; s < steps; ++s) {
    const uint32_t* b_step = b + 16 * s * b_stride;
    _tile_loadd(4, a + 16 * s, a_stride * 4);
    _tile_loadd(5, b_step, b_stride * 4);
    _tile_dpbf16ps(0, 4, 5);
    if (tiles > 1) {
      _tile_loadd(6, b_step + 16, b_stride * 4);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (tiles > 2) {
      _tile_loadd(7, b_step + 32, b_stride * 4);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (tiles > 3) {
      _tile_loadd(5, b_step + 48, b_stride * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, out, out_stride * 4);
  if (tiles > 1) _tile_stored(1, out + 16, out_stride * 4);
  if (tiles > 2) _tile_stored(2, out + 32, out_stride * 4);
  if (tiles > 3) _tile_stored(3, out + 48, out_stride * 4);
}

// raw[r][j] = q_r . k_j for 16 rows and the columns [j_begin, j_end) (multiples of 16), 64 at a
// time; q pairs are q_stride pairs apart, the keys' pair rows k_stride.
inline void amx_scores(const uint32_t* q_pairs, int q_stride, const uint32_t* k_pairs, int k_stride, int head_dim,
                       int j_begin, int j_end, float* raw) {
  for (int j = j_begin; j < j_end; j += 64) {
    const int tiles = (j_end - j) / 16 < 4 ? (j_end - j) / 16 : 4;
    amx_bf16_product(q_pairs, q_stride, k_pairs + j, k_stride, head_dim / 32, tiles, raw + j, kRowStride);
  }
}

// out[r][d] = sum over the pairs [i_begin, i_end) (multiples of 16) of probability pairs (row r's
// at prob_pairs + r * kRowStride) times value pairs, for 16 rows and every column of head_dim (a
// multiple of 16), 64 at a time. out rows are head_dim apart.
inline void amx_values(const uint32_t* prob_pairs, const uint32_t* v_pairs, int head_dim, int i_begin, int i_end,
                       float* out) {
  for (int d = 0; d < head_dim; d += 64) {
    const int tiles = (head_dim - d) / 16 < 4 ? (head_dim - d) / 16 : 4;
    amx_bf16_product(prob_pairs + i_begin, kRowStride, v_pairs + i_begin * head_dim + d, head_dim,
                     (i_end - i_begin) / 16, tiles, out + d, head_dim);
  }
}
#else
constexpr bool kAmxTiles = false;
#endif

void attention_forward_items(const AttentionParams& a, int cache_slots, int64_t begin, int64_t end, float* workspace) {
  const int bs = a.block_size;
  const int head_dim = static_cast<int>(a.head_dim);
  const int64_t num_q_blocks = (a.seq_len + bs - 1) / bs;
  const Band band = Band::from_queries(a);
  const float q_scale = a.scale * 1.4426950408889634f;
  const float inf = __builtin_inff();
  const SoftCap softcap(a.softcap);

  // Workspace: q tile, output accumulators, scores, row max / sum, then the key block cache.
  float* q_tile = workspace;                                         // [bs + kRowTile][head_dim]
  float* acc = q_tile + (kMaxBlockSize + kRowTile) * kMaxHeadDim;    // [bs + kRowTile][head_dim]
  constexpr int kScoreRows = modernbert_kernels::cpu::kAttentionScoreRows;
  float* scores = acc + (kMaxBlockSize + kRowTile) * kMaxHeadDim;    // [kScoreRows][kRowStride]
  float* row_max = scores + kScoreRows * kRowStride;                 // [bs + kRowTile]
  float* row_sum = row_max + kMaxBlockSize + kRowTile;               // [bs + kRowTile]
  [[maybe_unused]] float* products = row_sum + kMaxBlockSize + kRowTile;  // [kScoreRows][head_dim]
  float* cache = products + kScoreRows * kMaxHeadDim;
  const bool fp32 = a.dtype == ElementType::Float32;
  const bool bf16_dot = kBf16Dot && a.dtype == ElementType::BFloat16;
  // The AMX products (16-row groups), where the shapes make whole tiles.
  const bool amx = kAmxTiles && bf16_dot && head_dim % 32 == 0 && bs % 16 == 0;
#ifdef MBK_AMX_TILES
  if (amx) amx_configure_tiles();
#endif
  [[maybe_unused]] uint32_t* q_pairs = reinterpret_cast<uint32_t*>(q_tile);  // [bs + kRowTile][head_dim / 2]
  const size_t slot_floats = modernbert_kernels::cpu::attention_slot_floats(bs, head_dim, fp32);
  BlockCache slots(cache_slots);
  bool any_masked_key_in[modernbert_kernels::cpu::kMaxCacheSlots] = {};

  RowPrefetcher prefetcher;
  auto block_tag = [&](const WorkItem& w, int64_t j0) { return (w.batch * a.heads + w.head) * num_q_blocks + j0 / bs; };
  // Queues the keys and values of the key block at entry e of item w's layout row, unless packed already.
  auto prefetch_keys = [&](const WorkItem& w, int32_t e) {
    const int32_t* offsets = a.row_offsets + w.head * a.layout_head_stride;
    if (e >= offsets[w.block + 1]) return;
    const int64_t j0 = int64_t(a.col_indices[e]) * bs;
    if (j0 >= w.seq_len || slots.contains(block_tag(w, j0))) return;
    w.prefetch(a, prefetcher, a.k, a.k_stride, j0, bs);
    w.prefetch(a, prefetcher, a.v, a.v_stride, j0, bs);
  };

  // The online softmax of one row tile (the item's rows r0 to r0 + kRowTile - 1, scores at
  // score_rows, kRowStride apart, columns [j_begin, j_end), masked and maxed by `tile`): each row's
  // new max and sum, its rescale, and its probabilities in place of its scores.
  auto online_softmax = [&](const ScoreStore& tile, float* score_rows, int r0, int j_begin, int j_end,
                            float* rescale) {
    // The rows' new maxima, then their rescales 2^(old max - new max) in one vexp2.
    float new_max[kRowTile];
    vfloat max_drop = splat(0.f);
    for (int r = 0; r < kRowTile; ++r) {
      const float tile_max = reduce_max(tile.max[r]), old_max = row_max[r0 + r];
      new_max[r] = tile_max > old_max ? tile_max : old_max;  // NaN once the row is NaN
      max_drop[r] = new_max[r] == -inf ? 0.f : old_max - new_max[r];
    }
    const vfloat rescales = vexp2(max_drop);
    // Each row's probabilities replace its scores: fp32, or bf16 pairs at pair index j / 2 (the
    // bf16 products). Masked, padded and unseen columns get probability 0.
    for (int r = 0; r < kRowTile; ++r) {
      float* s = score_rows + r * kRowStride;
      rescale[r] = rescales[r];
      if (new_max[r] == -inf) {  // nothing visible yet: the row adds nothing, unless a score is NaN (max drops it)
        bool nan = false;
        for (int j = j_begin; j < j_end; ++j) nan |= s[j] != s[j];
        if (nan) rescale[r] = row_max[r0 + r] = row_sum[r0 + r] = __builtin_nanf("");
        for (int j = bf16_dot ? j_begin / 2 : j_begin; j < (bf16_dot ? j_end / 2 : j_end); j += kLanes)
          store(s + j, splat(0.f));
        continue;
      }
      // NaN and +inf scores need no test: s - max is NaN for them (inf - inf), so the row's sum,
      // output and lse become NaN, as in dense attention.
#ifdef MBK_BF16_DOT
      const float sum = bf16_dot ? exponentiate_to_pairs(s, j_begin, j_end, new_max[r])
                                 : exponentiate(s, j_begin, j_end, new_max[r]);
#else
      const float sum = exponentiate(s, j_begin, j_end, new_max[r]);
#endif
      row_sum[r0 + r] = row_sum[r0 + r] * rescale[r] + sum;
      row_max[r0 + r] = new_max[r];
    }
  };

  for (int64_t item = begin; item < end; ++item) {
    const WorkItem it(a, item, num_q_blocks);
    if (it.empty()) continue;
    const int64_t q_block = it.block, head = it.head, seq_len = it.seq_len, i0 = it.i0;
    const int rows = it.rows;
    // Rows set up for the products: whole row tiles, or whole 16-row groups (zero queries past the block).
    const int padded_rows = amx ? (rows + 15) / 16 * 16 : it.padded_rows;
    auto token_offset = [&](const int64_t* stride, int64_t token) { return it.offset(a, stride, token); };
    if (item + 1 < end) {  // the next item's queries and first key block arrive while this one computes
      const WorkItem next(a, item + 1, num_q_blocks);
      if (!next.empty()) {
        next.prefetch(a, prefetcher, a.q, a.q_stride, next.i0, next.rows);
        prefetch_keys(next, a.row_offsets[next.head * a.layout_head_stride + next.block]);
      }
    }
    for (int r = 0; r < padded_rows; ++r) {
      float* dst = q_tile + r * head_dim;
      if (bf16_dot) {  // q's bf16 pairs as they are; the scale multiplies the scores
        uint32_t* pairs = q_pairs + r * (head_dim / 2);
        if (r < rows)
          __builtin_memcpy(pairs, static_cast<const uint16_t*>(a.q) + token_offset(a.q_stride, i0 + r), head_dim * 2);
        else
          __builtin_memset(pairs, 0, head_dim * 2);
      } else if (r < rows) {
        load_row(a.q, token_offset(a.q_stride, i0 + r), a.dtype, q_scale, head_dim, dst);
      } else {
        for (int d = 0; d < head_dim; ++d) dst[d] = 0.f;
      }
      float* o = acc + r * head_dim;
      for (int d = 0; d < head_dim; ++d) o[d] = 0.f;
      row_max[r] = -inf;
      row_sum[r] = 0.f;
    }

    const int32_t* row_offsets = a.row_offsets + head * a.layout_head_stride;
    const int64_t q_last = i0 + rows - 1;
    for (int32_t e = row_offsets[q_block]; e < row_offsets[q_block + 1]; ++e) {
      const int64_t j0 = int64_t(a.col_indices[e]) * bs;
      if (j0 >= seq_len) break;  // sorted: the rest lie past the sequence
      const int keys = static_cast<int>(seq_len - j0 < bs ? seq_len - j0 : bs);
      if (band.misses(i0, q_last, j0, j0 + keys - 1)) continue;
      const int padded_keys = (keys + kLanes - 1) / kLanes * kLanes;

      prefetch_keys(it, e + 1);
      bool cached;
      const int slot = slots.find(block_tag(it, j0), &cached);
      float* k_t = cache + slot * slot_floats;                    // [head_dim][bs]
      float* key_bias = k_t + head_dim * bs;                       // [bs]
      float* v_tile = key_bias + bs;                               // [bs][head_dim], 16-bit inputs only
      if (!cached) {
        if (bf16_dot) {  // k and v as bf16 pairs (zeros past the last key)
          const uint16_t* k_in = static_cast<const uint16_t*>(a.k);
          const uint16_t* v_in = static_cast<const uint16_t*>(a.v);
          uint32_t* k_pairs = reinterpret_cast<uint32_t*>(k_t);     // [head_dim / 2][bs]
          uint32_t* v_pairs = reinterpret_cast<uint32_t*>(v_tile);  // [padded_keys / 2][head_dim]
          // Key rows of 32-bit pairs transposed as floats are (bit moves only), where the pairs fill
          // whole vectors and rows start a whole pair apart; element by element otherwise (an odd
          // token stride). The element-wise copy took a sixth of the amx build's windowed kernel.
          if ((head_dim / 2) % kLanes == 0 && a.k_stride[2] % 2 == 0) {
            transpose_rows(reinterpret_cast<const float*>(k_in + token_offset(a.k_stride, j0)), a.k_stride[2] / 2,
                           keys, padded_keys, head_dim / 2, k_t, bs);
          } else {
            for (int j = 0; j < padded_keys; ++j) {
              const uint32_t* k_row =
                  j < keys ? reinterpret_cast<const uint32_t*>(k_in + token_offset(a.k_stride, j0 + j)) : nullptr;
              for (int p = 0; p < head_dim / 2; ++p) k_pairs[p * bs + j] = k_row ? k_row[p] : 0u;
            }
          }
          // The AMX products read value pairs in groups of 16 (32 keys): zeros up to there.
          const int value_pairs = amx ? (padded_keys + 31) / 32 * 16 : padded_keys / 2;
          for (int i = 0; i < value_pairs; ++i) {
            const uint16_t* even = 2 * i < keys ? v_in + token_offset(a.v_stride, j0 + 2 * i) : nullptr;
            const uint16_t* odd = 2 * i + 1 < keys ? v_in + token_offset(a.v_stride, j0 + 2 * i + 1) : nullptr;
            interleave_rows(even, odd, head_dim, v_pairs + i * head_dim);
          }
        } else {
          if (fp32) {
            transpose_rows(static_cast<const float*>(a.k) + token_offset(a.k_stride, j0), a.k_stride[2], keys,
                           padded_keys, head_dim, k_t, bs);
          } else {  // keys converted to fp32 rows in the value tile, transposed, then the values
            for (int j = 0; j < keys; ++j)
              load_row(a.k, token_offset(a.k_stride, j0 + j), a.dtype, 1.f, head_dim, v_tile + j * head_dim);
            transpose_rows(v_tile, head_dim, keys, padded_keys, head_dim, k_t, bs);
            for (int j = 0; j < keys; ++j)
              load_row(a.v, token_offset(a.v_stride, j0 + j), a.dtype, 1.f, head_dim, v_tile + j * head_dim);
          }
        }
        // Keys past the sequence or padded out get -inf added to their scores.
        bool any_masked_key = padded_keys != keys;
        for (int j = 0; j < padded_keys; ++j) {
          const bool real = j < keys && it.key_is_real(a, j0 + j);
          key_bias[j] = real ? 0.f : -inf;
          any_masked_key |= !real;
        }
        any_masked_key_in[slot] = any_masked_key;
      }
      const bool any_masked_key = any_masked_key_in[slot];
      const float* v_rows = fp32 ? static_cast<const float*>(a.v) + token_offset(a.v_stride, j0) : v_tile;
      const int64_t v_row_stride = fp32 ? a.v_stride[2] : head_dim;

#ifdef MBK_AMX_TILES
      if (amx) {
        const uint32_t* k_pairs = reinterpret_cast<const uint32_t*>(k_t);
        const uint32_t* v_pairs = reinterpret_cast<const uint32_t*>(v_tile);
        for (int g0 = 0; g0 < rows; g0 += kAmxRows) {
          prefetcher.issue(32);
          // The columns some row of the group sees: the union of its row tiles' (the band moves
          // right with the rows). Rows past the block (zero queries) join in and are never stored.
          int j_begin = padded_keys, j_end = 0;
          for (int t = 0; t < kAmxRows; t += kRowTile) {
            int begin_t, end_t;
            if (!visible_columns(i0 + g0 + t, j0, padded_keys, band, &begin_t, &end_t)) continue;
            j_begin = begin_t < j_begin ? begin_t : j_begin;
            j_end = end_t > j_end ? end_t : j_end;
          }
          if (j_begin >= j_end) continue;
          amx_scores(q_pairs + g0 * (head_dim / 2), head_dim / 2, k_pairs, bs, head_dim, j_begin, j_end, scores);
          float rescale[kAmxRows];
          for (int t = 0; t < kAmxRows; t += kRowTile) {
            float* tile_scores = scores + t * kRowStride;
            ScoreStore tile(tile_scores, any_masked_key ? key_bias : nullptr, band, j0 - (i0 + g0 + t), q_scale,
                            softcap);
            // The tile's raw products through the same masking, scaling and max as the microkernels'.
            for_key_vectors(j_begin, j_end, [&](auto vectors, int j) {
              constexpr int kVectors = decltype(vectors)::value;
              vfloat raw_tile[kRowTile][kVectors];
              for (int r = 0; r < kRowTile; ++r)
                for (int c = 0; c < kVectors; ++c)
                  raw_tile[r][c] = load(tile_scores + r * kRowStride + j + c * kLanes);
              tile(raw_tile, j);
            });
            online_softmax(tile, tile_scores, g0 + t, j_begin, j_end, rescale + t);
          }
          // Probability pairs [j_begin / 2, j_end / 2) now start each row; the tiles read whole
          // groups of 16 pairs, so the pairs around them are zeroed.
          const int i_begin = j_begin / 2 / 16 * 16, i_end = (j_end / 2 + 15) / 16 * 16;
          for (int r = 0; r < kAmxRows; ++r) {
            uint32_t* pairs = reinterpret_cast<uint32_t*>(scores + r * kRowStride);
            for (int i = i_begin; i < j_begin / 2; ++i) pairs[i] = 0u;
            for (int i = j_end / 2; i < i_end; ++i) pairs[i] = 0u;
          }
          amx_values(reinterpret_cast<const uint32_t*>(scores), v_pairs, head_dim, i_begin, i_end, products);
          for (int r = 0; r < kAmxRows; ++r) {
            float* o = acc + (g0 + r) * head_dim;
            const float* added = products + r * head_dim;
            const vfloat rescale_r = splat(rescale[r]);
            for (int d = 0; d < head_dim; d += kLanes) store(o + d, load(o + d) * rescale_r + load(added + d));
          }
        }
        continue;
      }
#endif
      for (int r0 = 0; r0 < rows; r0 += kRowTile) {
        const int64_t first = i0 + r0;
        prefetcher.issue(8);
        int j_begin, j_end;
        if (!visible_columns(first, j0, padded_keys, band, &j_begin, &j_end)) continue;
        ScoreStore tile(scores, any_masked_key ? key_bias : nullptr, band, j0 - first, bf16_dot ? q_scale : 1.f,
                        softcap);
#ifdef MBK_BF16_DOT
        if (bf16_dot) {
          score_tile_bf16(q_pairs + r0 * (head_dim / 2), reinterpret_cast<const uint32_t*>(k_t), bs, head_dim, j_begin,
                          j_end, tile);
        } else
#endif
          score_tile(q_tile + r0 * head_dim, k_t, bs, head_dim, j_begin, j_end, tile);

        float rescale[kRowTile];
        online_softmax(tile, scores, r0, j_begin, j_end, rescale);
#ifdef MBK_BF16_DOT
        if (bf16_dot) {
          accumulate_tile_bf16(reinterpret_cast<const uint32_t*>(scores), reinterpret_cast<const uint32_t*>(v_tile),
                               head_dim, j_begin / 2, j_end / 2, rescale, acc + r0 * head_dim);
          continue;
        }
#endif
        accumulate_tile(scores, v_rows, v_row_stride, head_dim, j_begin, j_end < keys ? j_end : keys, rescale,
                        acc + r0 * head_dim);
      }
    }

    const float ln2 = 0.69314718055994531f;
    for (int r = 0; r < rows; ++r) {
      // 0 for a row that saw no key; a NaN sum (a NaN score) makes the output and lse NaN.
      const float total = row_sum[r];
      const float inverse = total == 0.f ? 0.f : 1.f / total;
      store_row(a.out, token_offset(a.out_stride, i0 + r), a.dtype, inverse, head_dim, acc + r * head_dim);
      a.lse[it.stat(a, i0 + r)] = total == 0.f ? inf : (row_max[r] + __builtin_log2f(total)) * ln2;
    }
  }
#ifdef MBK_AMX_TILES
  if (amx) _tile_release();
#endif
}

}  // namespace
