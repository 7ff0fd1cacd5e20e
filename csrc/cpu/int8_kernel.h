// The element-wise halves of the CPU int8 linear: per-token quantization (optionally fused with a
// bias-free LayerNorm and SmoothQuant smoothing) and the GEMM epilogue (both scales, bias, GELU or
// GeGLU, a residual, output cast). Included by the isa_*.cpp builds.
#pragma once

#include "../params.h"
#include "rows.h"

namespace {

using modernbert_kernels::Activation;
using modernbert_kernels::Int8LinearParams;
using modernbert_kernels::QuantizeParams;

inline vfloat activate(vfloat y, Activation activation) {
  if (activation == Activation::Gelu) return vgelu(y);
  if (activation == Activation::GeluTanh) return vgelu_tanh(y);
  return y;
}

// values[i] += residual[offset + i] for i < width, in fp32: the residual connection, added to a row
// of the epilogue while it is in L1.
inline void add_residual_row(const void* residual, int64_t offset, ElementType dtype, int64_t width, float* values) {
  int64_t i = 0;
  if (dtype == ElementType::Float32) {
    const float* p = static_cast<const float*>(residual) + offset;
    for (; i + kLanes <= width; i += kLanes) store(values + i, load(values + i) + load(p + i));
  } else if (dtype == ElementType::BFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(residual) + offset;
    for (; i + kLanes <= width; i += kLanes) store(values + i, load(values + i) + load_bf16(p + i));
  }
  for (; i < width; ++i) values[i] += load_element(residual, offset + i, dtype);
}

// Rows [row_begin, row_end) x columns [col_begin, col_end) of the GEMM, from their int32 sums
// (acc, row stride acc_stride, column col_begin first). col_begin is a multiple of kLanes (and
// even, for geglu's interleaved pairs).
void int8_epilogue_rows(const Int8LinearParams& a, const int32_t* acc_rows, int64_t acc_stride, int64_t row_begin,
                        int64_t row_end, int64_t col_begin, int64_t col_end) {
  const bool geglu = a.activation == Activation::Geglu;
  const int64_t out_cols = geglu ? a.n / 2 : a.n, out_begin = geglu ? col_begin / 2 : col_begin;
  // This range's columns of the GEMM (width) and of the output (out_width), from their first.
  const int64_t width = col_end - col_begin, out_width = geglu ? width / 2 : width;
  const float* w_scale = a.w_scale + col_begin;
  const float* bias = a.bias ? a.bias + col_begin : nullptr;
  float row_buffer[kLanes];
  // 16-bit outputs are computed into fp32 staging, then converted.
  float local[4096];
  float* staging = out_width <= 4096 ? local : new float[out_width];
  for (int64_t m = row_begin; m < row_end; ++m) {
    const int32_t* acc = acc_rows + (m - row_begin) * acc_stride;
    const float xs = a.x_scale[m];
    float* dst =
        a.out_dtype == ElementType::Float32 ? static_cast<float*>(a.out) + m * out_cols + out_begin : staging;
    int64_t c = 0;
    if (!geglu) {
      for (; c + kLanes <= width; c += kLanes) {
        vfloat y = __builtin_convertvector(load_int(acc + c), vfloat) * (load(w_scale + c) * xs);
        if (bias) y += load(bias + c);
        store(dst + c, activate(y, a.activation));
      }
      if (c < width) {  // tail: one vector with the missing lanes zero
        vfloat y = splat(0.f);
        for (int64_t l = 0; c + l < width; ++l)
          y[l] = float(acc[c + l]) * (w_scale[c + l] * xs) + (bias ? bias[c + l] : 0.f);
        store(row_buffer, activate(y, a.activation));
        for (int64_t l = 0; c + l < width; ++l) dst[c + l] = row_buffer[l];
      }
    } else {
      // Interleaved pairs (activated, gate): out[i] = gelu(y[2i]) * y[2i + 1].
      vint even, odd;
      for (int l = 0; l < kLanes; ++l) {
        even[l] = 2 * l;
        odd[l] = 2 * l + 1;
      }
      int64_t i = 0;
      for (; 2 * (i + kLanes) <= width; i += kLanes) {
        const int64_t col = 2 * i;
        vfloat lo = __builtin_convertvector(load_int(acc + col), vfloat) * (load(w_scale + col) * xs);
        vfloat hi = __builtin_convertvector(load_int(acc + col + kLanes), vfloat) * (load(w_scale + col + kLanes) * xs);
        if (bias) {
          lo += load(bias + col);
          hi += load(bias + col + kLanes);
        }
        vfloat activated = __builtin_shuffle(lo, hi, even);
        vfloat gate = __builtin_shuffle(lo, hi, odd);
        store(dst + i, vgelu(activated) * gate);
      }
      if (i < out_width) {
        vfloat activated = splat(0.f), gate = splat(0.f);
        for (int64_t l = 0; i + l < out_width; ++l) {
          const int64_t col = 2 * (i + l);
          activated[l] = float(acc[col]) * (w_scale[col] * xs) + (bias ? bias[col] : 0.f);
          gate[l] = float(acc[col + 1]) * (w_scale[col + 1] * xs) + (bias ? bias[col + 1] : 0.f);
        }
        store(row_buffer, vgelu(activated) * gate);
        for (int64_t l = 0; i + l < out_width; ++l) dst[i + l] = row_buffer[l];
      }
    }
    if (a.residual) add_residual_row(a.residual, m * out_cols + out_begin, a.out_dtype, out_width, dst);
    if (a.out_dtype != ElementType::Float32)
      store_row(a.out, m * out_cols + out_begin, a.out_dtype, 1.f, int(out_width), staging);
  }
  if (staging != local) delete[] staging;
}

void quantize_rows(const QuantizeParams& a, int64_t row_begin, int64_t row_end, float* x) {
  // Capturing lambdas: a captureless one converts to a function pointer, whose vector ABI -Wpsabi flags.
  const auto add = [&](vfloat u, vfloat v) { return u + v; };
  const auto max = [&](vfloat u, vfloat v) { return vmax(u, v); };
  const int64_t k = a.k;
  const int kv = static_cast<int>(k / kLanes * kLanes);  // vectorized prefix; the rest is scalar
  for (int64_t m = row_begin; m < row_end; ++m) {
    load_row(a.x, m * a.x_stride, a.dtype, 1.f, int(k), x);
    if (a.norm_weight) normalize_row(x, k, a.norm_weight, nullptr, a.eps);
    if (a.smooth) {
      for (int i = 0; i < kv; i += kLanes) store(x + i, load(x + i) * load(a.smooth + i));
      for (int64_t i = kv; i < k; ++i) x[i] *= a.smooth[i];
    }
    // x * 0 is NaN exactly where x is NaN or an Inf (max would drop a NaN).
    float amax = reduce_max(reduce_vectors(kv, splat(0.f), [&](int i) { return vabs(load(x + i)); }, max));
    float check = reduce_sum(reduce_vectors(kv, splat(0.f), [&](int i) { return load(x + i) * 0.f; }, add));
    for (int64_t i = kv; i < k; ++i) {
      amax = __builtin_fabsf(x[i]) > amax ? __builtin_fabsf(x[i]) : amax;
      check += x[i] * 0.f;
    }
    int8_t* q = a.q + m * k;
    if (check != 0.f) {  // a NaN or an Inf in the row: scale NaN (the linear's output row is NaN), zeros
      a.scale[m] = __builtin_nanf("");
      __builtin_memset(q, 0, k);
      continue;
    }
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    a.scale[m] = scale;
    // x / scale without a division (vdivps takes ~16 cycles a vector on AVX-512 CPUs, most of
    // this loop): Markstein's correction of q = x * RN(1 / scale), q + (x - q scale) * RN(1 / scale)
    // with the remainder exact in an FMA, is the correctly rounded quotient, the division's, wherever
    // 1 / scale and the remainder stay normal: scales in [2^-90, 2^90] (checked against the
    // division on 2e8 random pairs, ties included). Other scales, and builds without FMA, divide.
    const float inverse = 1.f / scale;
    const bool by_inverse = kHasFma && scale >= 0x1p-90f && scale <= 0x1p90f;
    // Round half away from zero: add +-1/2, clamp, truncate (the rule of the reference).
    for (int i = 0; i < kv; i += kLanes) {
      const vfloat xv = load(x + i);
      vfloat y;
      if (by_inverse) {
        const vfloat q = xv * inverse;
        y = vfma(vfma(-q, splat(scale), xv), splat(inverse), q);
      } else {
        y = xv / scale;
      }
      y += select(y < 0.f, splat(-0.5f), splat(0.5f));
      vint t = __builtin_convertvector(vmin(vmax(y, splat(-127.f)), splat(127.f)), vint);
      typedef signed char vbyte __attribute__((vector_size(kLanes)));
      vbyte bytes = __builtin_convertvector(t, vbyte);
      __builtin_memcpy(q + i, &bytes, kLanes);
    }
    for (int64_t i = kv; i < k; ++i) {
      float y = x[i] / scale;
      y += y < 0.f ? -0.5f : 0.5f;
      y = y < -127.f ? -127.f : (y > 127.f ? 127.f : y);
      q[i] = int8_t(y);
    }
  }
}

}  // namespace
