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

// dst[i] = src[offset + i] * scale for i < n (n a multiple of kLanes), converting to fp32.
inline void load_row(const void* src, int64_t offset, ElementType dtype, float scale, int n, float* dst) {
  if (dtype == ElementType::Float32) {
    const float* p = static_cast<const float*>(src) + offset;
    for (int i = 0; i < n; i += kLanes) store(dst + i, load(p + i) * scale);
  } else if (dtype == ElementType::BFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
    for (int i = 0; i < n; i += kLanes) store(dst + i, load_bf16(p + i) * scale);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
    for (int i = 0; i < n; ++i) dst[i] = half_to_float(p[i]) * scale;
  }
}

// dst[offset + i] = values[i] * scale for i < n (a multiple of kLanes), converting from fp32.
inline void store_row(void* dst, int64_t offset, ElementType dtype, float scale, int n, const float* values) {
  if (dtype == ElementType::Float32) {
    float* p = static_cast<float*>(dst) + offset;
    for (int i = 0; i < n; i += kLanes) store(p + i, load(values + i) * scale);
  } else if (dtype == ElementType::BFloat16) {
    uint16_t* p = static_cast<uint16_t*>(dst) + offset;
    for (int i = 0; i < n; i += kLanes) store_bf16(p + i, load(values + i) * scale);
  } else {
    for (int i = 0; i < n; ++i) store_element(dst, offset + i, values[i] * scale, dtype);
  }
}

}  // namespace
