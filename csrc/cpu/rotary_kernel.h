// Rotary position embedding on rows of [tokens, groups, head_dim]: the pair (i, i + head_dim / 2)
// of each row turns by the token's angle i. One pass over the rows, in place when out == x: each
// position is read before it is written and never read again. Included by the isa_*.cpp builds.
#pragma once

#include "rows.h"

namespace {

using modernbert_kernels::RotaryParams;

// Pairs [begin, half) of one row, one at a time, through the storage type's conversions.
template <typename Load, typename Store>
inline void rotate_pairs(int64_t begin, int64_t half, const float* c, const float* s, Load load_at, Store store_at) {
  for (int64_t i = begin; i < half; ++i) {
    const float x1 = load_at(i), x2 = load_at(i + half);
    store_at(i, x1 * c[i] - x2 * s[i]);
    store_at(i + half, x2 * c[i] + x1 * s[i]);
  }
}

void rotary_rows(const RotaryParams& a, int64_t token_begin, int64_t token_end) {
  const int64_t half = a.head_dim / 2;
  for (int64_t t = token_begin; t < token_end; ++t) {
    const float* c = a.cos + t * half;
    const float* s = a.sin + t * half;
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t src = t * a.x_stride[0] + g * a.x_stride[1];
      const int64_t dst = t * a.out_stride[0] + g * a.out_stride[1];
      if (a.dtype == ElementType::Float32) {
        const float* x = static_cast<const float*>(a.x) + src;
        float* out = static_cast<float*>(a.out) + dst;
        int64_t i = 0;
        for (; i + kLanes <= half; i += kLanes) {
          const vfloat x1 = load(x + i), x2 = load(x + half + i), cv = load(c + i), sv = load(s + i);
          store(out + i, x1 * cv - x2 * sv);
          store(out + half + i, x2 * cv + x1 * sv);
        }
        rotate_pairs(i, half, c, s, [&](int64_t j) { return x[j]; }, [&](int64_t j, float y) { out[j] = y; });
      } else if (a.dtype == ElementType::BFloat16) {
        const uint16_t* x = static_cast<const uint16_t*>(a.x) + src;
        uint16_t* out = static_cast<uint16_t*>(a.out) + dst;
        rotate_pairs(0, half, c, s, [&](int64_t j) { return bf16_to_float(x[j]); },
                     [&](int64_t j, float y) { out[j] = float_to_bf16(y); });
      } else {
        const uint16_t* x = static_cast<const uint16_t*>(a.x) + src;
        uint16_t* out = static_cast<uint16_t*>(a.out) + dst;
        rotate_pairs(0, half, c, s, [&](int64_t j) { return half_to_float(x[j]); },
                     [&](int64_t j, float y) { out[j] = float_to_half(y); });
      }
    }
  }
}

}  // namespace
