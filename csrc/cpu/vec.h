// Portable SIMD through GCC/Clang vector extensions: the including translation unit sets the
// target ISA (#pragma GCC target) and kLanes, and the compiler emits AVX-512, AVX2 or SSE2 code
// from the same source. Everything here has internal linkage, so the ISA builds never share a
// symbol. Include only after every system header the translation unit needs.
#pragma once

#ifndef MBK_LANES
#error "define MBK_LANES (floats per vector) before including vec.h"
#endif

#include <cstdint>

namespace {

constexpr int kLanes = MBK_LANES;
typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int vint __attribute__((vector_size(kLanes * 4)));
// Unaligned views for loads and stores.
typedef float vfloat_u __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int vint_u __attribute__((vector_size(kLanes * 4), aligned(4)));

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_u*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat_u*>(p) = v; }
inline vint load_int(const int* p) { return *reinterpret_cast<const vint_u*>(p); }
// x - (+0) is x for every x (x + 0 is not, for -0), so this folds to a bare broadcast.
inline vfloat splat(float x) { return x - vfloat{}; }

inline vint iota() {
  vint v;
  for (int i = 0; i < kLanes; ++i) v[i] = i;
  return v;
}

inline vfloat select(vint mask, vfloat a, vfloat b) { return mask ? a : b; }

// a * b + c rounded once. The 8- and 16-lane builds target FMA; the 4-lane baseline has none, so
// there it is two roundings, and code whose result needs the single rounding tests kHasFma.
#if MBK_LANES == 16
constexpr bool kHasFma = true;
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
#elif MBK_LANES == 8
constexpr bool kHasFma = true;
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
#else
constexpr bool kHasFma = false;
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
#endif

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vfloat vmin(vfloat a, vfloat b) { return a < b ? a : b; }

// op over every lane: the upper half folded onto the lower half until one lane is left, each step
// on half as wide a vector (constant shuffles: a butterfly whose index vectors are built in a
// loop was compiled into ~15 instructions a step).
typedef float vfloat8 __attribute__((vector_size(32)));
typedef float vfloat4 __attribute__((vector_size(16)));
typedef float vfloat2 __attribute__((vector_size(8)));
template <typename Op>
inline float reduce(vfloat v, Op op) {
#if MBK_LANES == 16
  const vfloat8 v8 = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const vfloat4 v4 = op(__builtin_shufflevector(v8, v8, 0, 1, 2, 3), __builtin_shufflevector(v8, v8, 4, 5, 6, 7));
#elif MBK_LANES == 8
  const vfloat4 v4 = op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  const vfloat4 v4 = v;
#endif
  const vfloat2 v2 = op(__builtin_shufflevector(v4, v4, 0, 1), __builtin_shufflevector(v4, v4, 2, 3));
  return op(v2[0], v2[1]);
}

inline float reduce_max(vfloat v) {
  return reduce(v, [](auto a, auto b) { return a > b ? a : b; });
}
inline float reduce_sum(vfloat v) {
  return reduce(v, [](auto a, auto b) { return a + b; });
}

// The first and second halves of a and b interleaved: (a0, b0, a1, b1, ...) and the rest.
inline vfloat interleave_low(vfloat a, vfloat b) {
#if MBK_LANES == 16
  return __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
#elif MBK_LANES == 8
  return __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11);
#else
  return __builtin_shufflevector(a, b, 0, 4, 1, 5);
#endif
}
inline vfloat interleave_high(vfloat a, vfloat b) {
#if MBK_LANES == 16
  return __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#elif MBK_LANES == 8
  return __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15);
#else
  return __builtin_shufflevector(a, b, 2, 6, 3, 7);
#endif
}

// A kLanes x kLanes tile transposed in registers: log2(kLanes) rounds, each interleaving row i
// with row i + kLanes / 2 into rows 2i and 2i + 1, make row r hold column r.
inline void transpose_tile(vfloat (&rows)[kLanes]) {
  for (int round = 1; round < kLanes; round *= 2) {
    vfloat next[kLanes];
#pragma GCC unroll 16
    for (int i = 0; i < kLanes / 2; ++i) {
      next[2 * i] = interleave_low(rows[i], rows[i + kLanes / 2]);
      next[2 * i + 1] = interleave_high(rows[i], rows[i + kLanes / 2]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) rows[i] = next[i];
  }
}

inline vfloat vabs(vfloat a) { return a < 0.f ? -a : a; }

// 2^x to ~2e-7 relative, NaN for NaN (attention needs a NaN score to reach its row's output and
// gradients): x = n + f with n = round(x) and |f| <= 1/2, 2^f by its degree-6 Taylor series
// (coefficients ln2^k / k!; truncation error (ln 2 / 2)^7 / 7! = 1.2e-7), times 2^n. Exactly 0 far
// enough below -126 (-inf included), so masked scores contribute nothing.
inline vfloat exp2_fraction(vfloat f) {
  vfloat p = splat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 0.24022650695910071f;
  p = p * f + 0.69314718055994531f;
  return p * f + 1.f;
}

#if MBK_LANES == 16  // the AVX-512 builds (g++ does not define __AVX512F__ under #pragma GCC target)
// AVX-512: round and 2^n in one instruction each (vrndscaleps, vscalefps). Exactly 0 below -126,
// as in the other builds: a vscalefps whose result is a denormal (or underflows to 0 from one)
// takes a microcode assist, and softmax rows feed it many such inputs (masked keys, far scores).
// Flushing them made the AMX build's bf16 sliding-window attention 1.57x faster on a Xeon.
inline vfloat vexp2(vfloat x) {
  // Clamped so that +inf gives inf (not inf - inf); the constant first, so the NaN x is what each
  // clamp keeps. The maskz forms with every lane set: the unmasked intrinsics pass
  // _mm512_undefined_ps, which GCC 12 warns is uninitialized.
  const vfloat xc = vmin(splat(128.f), vmax(splat(-126.f), x));
  const __m512 n =
      _mm512_maskz_roundscale_ps(__mmask16(0xFFFF), (__m512)xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vfloat power = (vfloat)_mm512_maskz_scalef_ps(__mmask16(0xFFFF), (__m512)exp2_fraction(xc - (vfloat)n), n);
  return select(x < -126.f, splat(0.f), power);
}
#else
// Rounding adds 1.5 * 2^23, whose float has unit spacing, so the sum's low bits hold n; 2^n is
// built in the exponent bits. Exactly 0 below -126.
inline vfloat vexp2(vfloat x) {
  constexpr float kRoundingShift = 12582912.f;  // 1.5 * 2^23
  // The constant first: a comparison with a NaN is false, so the NaN x is what each clamp keeps.
  vfloat xc = vmin(splat(127.f), vmax(splat(-126.f), x));
  vfloat shifted = xc + kRoundingShift;
  vfloat n = shifted - kRoundingShift;
  vint bits;
  __builtin_memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;
  vfloat two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(bits));
  return select(x < -126.f, splat(0.f), exp2_fraction(xc - n) * two_n);
}
#endif

inline vfloat vexp(vfloat x) { return vexp2(x * 1.4426950408889634f); }

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
inline vfloat verf(vfloat x) {
  vfloat z = vabs(x);
  vfloat t = 1.f / (1.f + 0.3275911f * z);
  vfloat poly = splat(1.061405429f);
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  vfloat r = 1.f - poly * t * vexp(-z * z);
  return select(x < 0.f, -r, r);
}

inline vfloat vgelu(vfloat x) { return 0.5f * x * (1.f + verf(x * 0.70710678118654752f)); }

// gelu with the tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1), saturating cleanly.
inline vfloat vgelu_tanh(vfloat x) {
  vfloat u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
  vfloat tanh_u = 1.f - 2.f / (vexp(2.f * u) + 1.f);
  return 0.5f * x * (1.f + tanh_u);
}

// Scalar conversions for the 16-bit storage types (round to nearest even; inputs are finite or inf).
inline uint32_t bits_of(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  return bits;
}

inline float float_of(uint32_t bits) {
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) { return float_of(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t bits = bits_of(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// kLanes bf16 at once, as the two functions above (round to nearest even, NaN kept quiet).
typedef uint16_t vbf16_u __attribute__((vector_size(kLanes * 2), aligned(2)));
typedef unsigned vuint __attribute__((vector_size(kLanes * 4)));
typedef unsigned vuint_u __attribute__((vector_size(kLanes * 4), aligned(4)));

inline vfloat load_bf16(const uint16_t* p) {
  return (vfloat)(__builtin_convertvector(*reinterpret_cast<const vbf16_u*>(p), vuint) << 16);
}

inline void store_bf16(uint16_t* p, vfloat v) {
  const vuint bits = (vuint)v;
  const vuint rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const vuint out = (bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded;
  *reinterpret_cast<vbf16_u*>(p) = __builtin_convertvector(out, vbf16_u);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return float_of(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return float_of(sign);
  const float f = float(mantissa) * 5.9604644775390625e-8f;  // subnormal: mantissa * 2^-24
  return sign ? -f : f;
}

inline uint16_t float_to_half(float f) {
  const uint32_t bits = bits_of(f);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504: inf
  if (magnitude < 0x38800000u) {  // below the smallest normal half: round to a multiple of 2^-24
    // Adding 0.5 forces the sum's low mantissa bits to hold a * 2^24, rounded to nearest even.
    const uint32_t shifted = bits_of(float_of(magnitude) + 0.5f);
    return uint16_t(sign | (shifted - 0x3f000000u));  // 0x400 when it rounds up to the smallest normal
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return uint16_t(sign | ((rounded - (112u << 23)) >> 13));
}

// Calls f(VectorCount<n>{}) for n = count in 1..3: the tails of loops that step 3 or 4 vectors.
template <int N>
struct VectorCount {
  static constexpr int value = N;
};

template <typename F>
inline void with_tail_vectors(int count, F&& f) {
  switch (count) {
    case 3: f(VectorCount<3>{}); break;
    case 2: f(VectorCount<2>{}); break;
    case 1: f(VectorCount<1>{}); break;
    default: break;
  }
}

}  // namespace
