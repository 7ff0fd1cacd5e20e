// Loads and stores of fp32 / bf16 / fp16 storage as fp32, one element or one row at a time: what
// every CPU kernel reads its inputs and writes its outputs through. Included by the kernel headers
// of the isa_*.cpp builds.
#pragma once

#include "../params.h"
#include "vec.h"

namespace {

using modernbert_kernels::ElementType;

inline float load_element(const void* base, int64_t index, ElementType dtype) {
  switch (dtype) {
    case ElementType::Float32: return static_cast<const float*>(base)[index];
    case ElementType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
    default: return half_to_float(static_cast<const uint16_t*>(base)[index]);
  }
}

inline void store_element(void* base, int64_t index, float value, ElementType dtype) {
  switch (dtype) {
    case ElementType::Float32: static_cast<float*>(base)[index] = value; break;
    case ElementType::BFloat16: static_cast<uint16_t*>(base)[index] = float_to_bf16(value); break;
    default: static_cast<uint16_t*>(base)[index] = float_to_half(value); break;
  }
}

// dst[i] = src[offset + i] * scale for i < n, converting to fp32: whole vectors, then the rest one
// element at a time.
inline void load_row(const void* src, int64_t offset, ElementType dtype, float scale, int n, float* dst) {
  const int whole = n / kLanes * kLanes;
  if (dtype == ElementType::Float32) {
    const float* p = static_cast<const float*>(src) + offset;
    for (int i = 0; i < whole; i += kLanes) store(dst + i, load(p + i) * scale);
  } else if (dtype == ElementType::BFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
    for (int i = 0; i < whole; i += kLanes) store(dst + i, load_bf16(p + i) * scale);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
    for (int i = 0; i < n; ++i) dst[i] = half_to_float(p[i]) * scale;
    return;
  }
  for (int i = whole; i < n; ++i) dst[i] = load_element(src, offset + i, dtype) * scale;
}

// dst[offset + i] = values[i] * scale for i < n, converting from fp32: whole vectors, then the rest
// one element at a time.
inline void store_row(void* dst, int64_t offset, ElementType dtype, float scale, int n, const float* values) {
  const int whole = n / kLanes * kLanes;
  if (dtype == ElementType::Float32) {
    float* p = static_cast<float*>(dst) + offset;
    for (int i = 0; i < whole; i += kLanes) store(p + i, load(values + i) * scale);
  } else if (dtype == ElementType::BFloat16) {
    uint16_t* p = static_cast<uint16_t*>(dst) + offset;
    for (int i = 0; i < whole; i += kLanes) store_bf16(p + i, load(values + i) * scale);
  } else {
    for (int i = 0; i < n; ++i) store_element(dst, offset + i, values[i] * scale, dtype);
    return;
  }
  for (int i = whole; i < n; ++i) store_element(dst, offset + i, values[i] * scale, dtype);
}

// op-reduces value(i) over the vectors i < kv (a multiple of kLanes) of a row in four independent
// chains, then combines them. A single chain waits on its last op's latency (~4 cycles) at every
// vector: most of a row's time in the reductions below.
template <typename Value, typename Op>
inline vfloat reduce_vectors(int kv, vfloat init, Value value, Op op) {
  vfloat a0 = init, a1 = init, a2 = init, a3 = init;
  int i = 0;
  for (; i + 4 * kLanes <= kv; i += 4 * kLanes) {
    a0 = op(a0, value(i));
    a1 = op(a1, value(i + kLanes));
    a2 = op(a2, value(i + 2 * kLanes));
    a3 = op(a3, value(i + 3 * kLanes));
  }
  for (; i < kv; i += kLanes) a0 = op(a0, value(i));
  return op(op(a0, a1), op(a2, a3));
}

// LayerNorm of one fp32 row of k values in place: two-pass mean and variance in fp32, then
// (x - mean) * rstd * weight (+ bias; null: none).
inline void normalize_row(float* x, int64_t k, const float* weight, const float* bias, float eps) {
  // Capturing lambdas: a captureless one converts to a function pointer, whose vector ABI -Wpsabi flags.
  const auto add = [&](vfloat u, vfloat v) { return u + v; };
  const int kv = static_cast<int>(k / kLanes * kLanes);  // vectorized prefix; the rest is scalar
  float total = reduce_sum(reduce_vectors(kv, splat(0.f), [&](int i) { return load(x + i); }, add));
  for (int64_t i = kv; i < k; ++i) total += x[i];
  const float mean = total / float(k);
  const auto centered_square = [&](int i) {
    const vfloat centered = load(x + i) - mean;
    return centered * centered;
  };
  float square_total = reduce_sum(reduce_vectors(kv, splat(0.f), centered_square, add));
  for (int64_t i = kv; i < k; ++i) square_total += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.f / __builtin_sqrtf(square_total / float(k) + eps);
  for (int i = 0; i < kv; i += kLanes) {
    const vfloat y = (load(x + i) - mean) * rstd * load(weight + i);
    store(x + i, bias ? y + load(bias + i) : y);
  }
  for (int64_t i = kv; i < k; ++i) {
    const float y = (x[i] - mean) * rstd * weight[i];
    x[i] = bias ? y + bias[i] : y;
  }
}

}  // namespace
