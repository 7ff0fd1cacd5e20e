// Block-sparse attention backward on the CPU, in two passes (no atomics):
//   dq pass, one work item per (batch, head, query block): recomputes P = exp(scale q k^T - lse)
//     for the visited key blocks, dS = P * (dO v^T - delta), dq = scale dS k; writes delta.
//   dk/dv pass, one item per (batch, head, key block) over the transposed layout: the same P and
//     dS seen from the keys' side, dv = P^T dO, dk = scale dS^T q.
// Both reuse the forward's microkernels: scores come from score_tile on transposed packed blocks,
// products with rows from accumulate_tile. Included by the isa_*.cpp builds.
#pragma once

#include "attention_kernel.h"

namespace {

using modernbert_kernels::AttentionBackwardParams;
using modernbert_kernels::cpu::BackwardPass;

// Two row operands read together: (q, dO) on the queries' side, (k, v) on the keys' side.
struct RowPair {
  const void* a;
  const int64_t* a_stride;
  const void* b;
  const int64_t* b_stride;
};

inline RowPair row_pair(const AttentionBackwardParams& p, bool queries) {
  return queries ? RowPair{p.q, p.q_stride, p.dout, p.dout_stride} : RowPair{p.k, p.k_stride, p.v, p.v_stride};
}

struct BackwardWorkspace {
  float* rows_a;  // [bs + kRowTile][head_dim]: q (dq pass) or k (dk/dv pass), scaled by scale * log2(e)
  float* rows_b;  // dO or v
  float* acc_a;   // dq, or dk
  float* acc_b;   // dv
  float* s;       // [kRowTile][kRowStride] scores, then P
  float* dp;      // dP, then dS
  float* stat_a;  // [bs + kRowTile]: lse * log2(e) per query (dq pass) or key validity (dk/dv pass)
  float* stat_b;  // delta per query (dq pass)
  float* cache;

  explicit BackwardWorkspace(float* w) {
    const int tile = (kMaxBlockSize + kRowTile) * kMaxHeadDim;
    rows_a = w, rows_b = w + tile, acc_a = w + 2 * tile, acc_b = w + 3 * tile;
    s = w + 4 * tile;
    dp = s + kRowTile * kRowStride;
    stat_a = dp + kRowTile * kRowStride;
    stat_b = stat_a + kMaxBlockSize + kRowTile;
    cache = stat_b + kMaxBlockSize + kRowTile;
  }
};

// A packed block of the other side: two operands transposed ([head_dim][kRowStride]) for the
// scores, the same two as fp32 rows ([bs][head_dim]) for the products, two per-column vectors.
struct PackedBlock {
  float *t_a, *t_b, *rows_a, *rows_b, *vec_a, *vec_b;
  PackedBlock(float* cache, int slot) {
    float* base = cache + slot * modernbert_kernels::cpu::kBackwardSlotFloats;
    t_a = base, t_b = base + kMaxHeadDim * kRowStride;
    rows_a = base + 2 * kMaxHeadDim * kRowStride, rows_b = rows_a + kMaxBlockSize * kMaxHeadDim;
    vec_a = rows_b + kMaxBlockSize * kMaxHeadDim, vec_b = vec_a + kRowStride;
  }
};

void attention_backward_items(const AttentionBackwardParams& a, BackwardPass pass, int64_t begin, int64_t end,
                              float* workspace) {
  const int bs = a.block_size;
  const int head_dim = static_cast<int>(a.head_dim);
  const int64_t num_blocks = (a.seq_len + bs - 1) / bs;
  const float log2e = 1.4426950408889634f;
  const float inf = __builtin_inff();
  const bool dq_pass = pass == BackwardPass::Dq;
  const Band band = dq_pass ? Band::from_queries(a) : Band::from_keys(a);
  const SoftCap softcap(a.softcap);
  BackwardWorkspace w(workspace);
  BlockCache slots(modernbert_kernels::cpu::kBackwardCacheSlots);
  float ones[kRowTile];
  for (int r = 0; r < kRowTile; ++r) ones[r] = 1.f;

  for (int64_t item = begin; item < end; ++item) {
    const WorkItem it(a, item, num_blocks);  // rows: queries (dq pass) or keys (dk/dv pass)
    if (it.empty()) continue;
    const int64_t block = it.block, head = it.head, batch = it.batch, seq_len = it.seq_len, i0 = it.i0;
    const int rows = it.rows, padded_rows = it.padded_rows;
    auto offset = [&](const int64_t* stride, int64_t token) { return it.offset(a, stride, token); };

    // This item's own rows: (q, dO, lse, delta) or (k, v, key validity).
    const RowPair own = row_pair(a, dq_pass);
    for (int r = 0; r < padded_rows; ++r) {
      float* ra = w.rows_a + r * head_dim;
      float* rb = w.rows_b + r * head_dim;
      for (int d = 0; d < head_dim; ++d) w.acc_a[r * head_dim + d] = w.acc_b[r * head_dim + d] = 0.f;
      if (r >= rows) {
        for (int d = 0; d < head_dim; ++d) ra[d] = rb[d] = 0.f;
        w.stat_a[r] = dq_pass ? inf : 0.f;
        w.stat_b[r] = 0.f;
        continue;
      }
      load_row(own.a, offset(own.a_stride, i0 + r), a.dtype, a.scale * log2e, head_dim, ra);
      load_row(own.b, offset(own.b_stride, i0 + r), a.dtype, 1.f, head_dim, rb);
      if (dq_pass) {
        // delta = rowsum(dO * O), kept for the dk/dv pass.
        load_row(a.out, offset(a.out_stride, i0 + r), a.dtype, 1.f, head_dim, w.s);
        vfloat sum = splat(0.f);
        for (int d = 0; d < head_dim; d += kLanes) sum += load(w.s + d) * load(rb + d);
        const int64_t stat = it.stat(a, i0 + r);
        w.stat_b[r] = a.delta[stat] = reduce_sum(sum);
        w.stat_a[r] = a.lse[stat] * log2e;
      } else {
        w.stat_a[r] = it.key_is_real(a, i0 + r) ? 1.f : 0.f;
      }
    }

    // The other side's blocks: key blocks of the layout row, or query blocks of the transposed one.
    const int32_t* offsets = (dq_pass ? a.row_offsets : a.col_offsets) + head * a.layout_head_stride;
    const int32_t* indices = dq_pass ? a.col_indices : a.row_indices;
    for (int32_t e = offsets[block]; e < offsets[block + 1]; ++e) {
      const int64_t j0 = int64_t(indices[e]) * bs;
      if (j0 >= seq_len) break;
      const int cols = static_cast<int>(seq_len - j0 < bs ? seq_len - j0 : bs);
      if (band.misses(i0, i0 + rows - 1, j0, j0 + cols - 1)) continue;
      const int padded_cols = (cols + kLanes - 1) / kLanes * kLanes;

      bool cached;
      const int slot = slots.find((batch * a.heads + head) * num_blocks + j0 / bs, &cached);
      PackedBlock other(w.cache, slot);
      if (!cached) {
        // dq pass: keys (k^T, v^T, k rows, key bias); dk/dv pass: queries (q^T, dO^T, q rows,
        // dO rows, lse * log2(e), delta).
        const RowPair src = row_pair(a, !dq_pass);
        // Rows past cols are left as they are: the products stop at cols, and the transposes
        // write zeros for them.
        for (int j = 0; j < padded_cols; ++j) {
          if (j < cols) {
            load_row(src.a, offset(src.a_stride, j0 + j), a.dtype, 1.f, head_dim, other.rows_a + j * head_dim);
            load_row(src.b, offset(src.b_stride, j0 + j), a.dtype, 1.f, head_dim, other.rows_b + j * head_dim);
          }
          if (dq_pass) {
            other.vec_a[j] = j < cols && it.key_is_real(a, j0 + j) ? 0.f : -inf;  // key bias
          } else {
            other.vec_a[j] = j < cols ? a.lse[it.stat(a, j0 + j)] * log2e : inf;
            other.vec_b[j] = j < cols ? a.delta[it.stat(a, j0 + j)] : 0.f;
          }
        }
        transpose_rows(other.rows_a, head_dim, cols, padded_cols, head_dim, other.t_a, kRowStride);
        transpose_rows(other.rows_b, head_dim, cols, padded_cols, head_dim, other.t_b, kRowStride);
      }

      for (int r0 = 0; r0 < rows; r0 += kRowTile) {
        const int64_t first = i0 + r0;
        int c_begin, c_end;
        if (!visible_columns(first, j0, padded_cols, band, &c_begin, &c_end)) continue;
        PlainScoreStore scores{w.s}, dp_scores{w.dp};
        score_tile(w.rows_a + r0 * head_dim, other.t_a, kRowStride, head_dim, c_begin, c_end, scores);
        score_tile(w.rows_b + r0 * head_dim, other.t_b, kRowStride, head_dim, c_begin, c_end, dp_scores);
        for (int r = 0; r < kRowTile; ++r) {
          float* s = w.s + r * kRowStride;
          float* dp = w.dp + r * kRowStride;
          const int64_t i = first + r;
          const bool row_live = dq_pass ? true : w.stat_a[r0 + r] != 0.f;
          for (int c = c_begin; c < c_end; c += kLanes) {
            vfloat sv = load(s + c);
            vfloat slope = splat(1.f);  // d capped / d score: 1 - tanh^2 under the cap
            if (softcap.on()) {
              const vfloat t = softcap.tanh(sv);
              sv = splat(softcap.bound) * t;
              slope = splat(1.f) - t * t;
            }
            if (band.on) {
              vint distance = iota() + static_cast<int>(j0 + c - i);  // column - row
              sv = select((distance >= -static_cast<int>(band.below)) & (distance <= static_cast<int>(band.above)),
                          sv, splat(-inf));
            }
            vfloat p, ds;
            // NaN scores or a NaN lse (a row the forward made NaN) keep their NaN through exp.
            if (dq_pass) {
              sv = select(load(other.vec_a + c) == 0.f, sv, splat(-inf));  // masked keys
              p = vexp2(sv - w.stat_a[r0 + r]);
              ds = p * (load(dp + c) - w.stat_b[r0 + r]);
            } else {
              p = vexp2(sv - load(other.vec_a + c));
              ds = p * (load(dp + c) - load(other.vec_b + c));
              if (!row_live) p = ds = splat(0.f);
            }
            store(s + c, p);
            store(dp + c, ds * slope);
          }
        }
        const int c_stop = c_end < cols ? c_end : cols;
        if (dq_pass) {
          accumulate_tile(w.dp, other.rows_a, head_dim, head_dim, c_begin, c_stop, ones, w.acc_a + r0 * head_dim);
        } else {
          accumulate_tile(w.dp, other.rows_a, head_dim, head_dim, c_begin, c_stop, ones, w.acc_a + r0 * head_dim);
          accumulate_tile(w.s, other.rows_b, head_dim, head_dim, c_begin, c_stop, ones, w.acc_b + r0 * head_dim);
        }
      }
    }

    for (int r = 0; r < rows; ++r) {
      const int64_t grad = offset(a.grad_stride, i0 + r);
      if (dq_pass) {
        store_row(a.dq, grad, a.dtype, a.scale, head_dim, w.acc_a + r * head_dim);
      } else {
        store_row(a.dk, grad, a.dtype, a.scale, head_dim, w.acc_a + r * head_dim);
        store_row(a.dv, grad, a.dtype, 1.f, head_dim, w.acc_b + r * head_dim);
      }
    }
  }
}

}  // namespace
