// A short vector of floats or doubles, as wide as the vector registers of the instruction
// set this translation unit is compiled for (GCC/Clang vector extensions): 64 bytes with
// AVX-512, 32 with AVX, 16 otherwise (SSE, NEON). The kernels are written in terms of
// Vec<T> and kLanes<T>, so one source compiles to each instruction set with its own width.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "cpu/kernels/variant.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#elif defined(__aarch64__)
constexpr int kVectorBytes = 16;
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorBytes = 16;
constexpr int kVectorRegisters = 16;
#endif

template <typename T>
struct RawVector;
template <>
struct RawVector<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t bits __attribute__((vector_size(kVectorBytes)));
};
template <>
struct RawVector<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef int64_t bits __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(T));

template <typename T>
struct Vec {
  using Raw = typename RawVector<T>::type;
  using Bits = typename RawVector<T>::bits;
  using element_type = T;
  Raw raw;

  Vec() = default;
  // Every lane x: x - 0 is x for every x (also -0 and NaN), so the compiler folds the
  // subtraction and emits one broadcast (x + 0 would not fold: -0 + 0 is +0).
  C10_ALWAYS_INLINE Vec(T x) : raw(x - Raw{}) {}  // NOLINT(google-explicit-constructor)
  static C10_ALWAYS_INLINE Vec of(Raw r) {
    Vec v;
    v.raw = r;
    return v;
  }
  // Unaligned load and store of kLanes<T> elements.
  static C10_ALWAYS_INLINE Vec load(const T* p) {
    Raw r;
    std::memcpy(&r, p, sizeof(Raw));
    return of(r);
  }
  C10_ALWAYS_INLINE void store(T* p) const { std::memcpy(p, &raw, sizeof(Raw)); }
  C10_ALWAYS_INLINE T operator[](int64_t lane) const { return raw[lane]; }

  friend C10_ALWAYS_INLINE Vec operator+(Vec a, Vec b) { return of(a.raw + b.raw); }
  friend C10_ALWAYS_INLINE Vec operator-(Vec a, Vec b) { return of(a.raw - b.raw); }
  friend C10_ALWAYS_INLINE Vec operator*(Vec a, Vec b) { return of(a.raw * b.raw); }
  friend C10_ALWAYS_INLINE Vec operator/(Vec a, Vec b) { return of(a.raw / b.raw); }
  friend C10_ALWAYS_INLINE Vec operator-(Vec a) { return of(-a.raw); }
  C10_ALWAYS_INLINE Vec& operator+=(Vec b) { return *this = *this + b; }
  C10_ALWAYS_INLINE Vec& operator*=(Vec b) { return *this = *this * b; }
};

// a * b + c, rounded once where the instruction set has a fused multiply-add (else a
// multiply and an add). Explicit, never left to the compiler (the kernels are compiled
// with -ffp-contract=off): an expression written the same way gives the same bits in
// every function, which is how the backward recomputes the forward's couplings exactly.
C10_ALWAYS_INLINE Vec<float> fma(Vec<float> a, Vec<float> b, Vec<float> c) {
  using Raw [[maybe_unused]] = Vec<float>::Raw;
#if defined(__AVX512F__)
  return Vec<float>::of(reinterpret_cast<Raw>(_mm512_fmadd_ps(
      reinterpret_cast<__m512>(a.raw), reinterpret_cast<__m512>(b.raw), reinterpret_cast<__m512>(c.raw))));
#elif defined(__FMA__)
  return Vec<float>::of(reinterpret_cast<Raw>(_mm256_fmadd_ps(
      reinterpret_cast<__m256>(a.raw), reinterpret_cast<__m256>(b.raw), reinterpret_cast<__m256>(c.raw))));
#elif defined(__aarch64__)
  return Vec<float>::of(reinterpret_cast<Raw>(vfmaq_f32(
      reinterpret_cast<float32x4_t>(c.raw), reinterpret_cast<float32x4_t>(a.raw),
      reinterpret_cast<float32x4_t>(b.raw))));
#else
  return a * b + c;
#endif
}

C10_ALWAYS_INLINE Vec<double> fma(Vec<double> a, Vec<double> b, Vec<double> c) {
  using Raw [[maybe_unused]] = Vec<double>::Raw;
#if defined(__AVX512F__)
  return Vec<double>::of(reinterpret_cast<Raw>(_mm512_fmadd_pd(
      reinterpret_cast<__m512d>(a.raw), reinterpret_cast<__m512d>(b.raw), reinterpret_cast<__m512d>(c.raw))));
#elif defined(__FMA__)
  return Vec<double>::of(reinterpret_cast<Raw>(_mm256_fmadd_pd(
      reinterpret_cast<__m256d>(a.raw), reinterpret_cast<__m256d>(b.raw), reinterpret_cast<__m256d>(c.raw))));
#elif defined(__aarch64__)
  return Vec<double>::of(reinterpret_cast<Raw>(vfmaq_f64(
      reinterpret_cast<float64x2_t>(c.raw), reinterpret_cast<float64x2_t>(a.raw),
      reinterpret_cast<float64x2_t>(b.raw))));
#else
  return a * b + c;
#endif
}

// Loads x into a register for good: the compiler may no longer fold the load into each
// instruction that uses x (it treats a memory operand as free, so a vector used by four
// multiply-adds would be loaded four times, and the loads, not the multiply-adds, would
// bound the register-tiled loops).
template <typename T>
C10_ALWAYS_INLINE Vec<T> in_register(Vec<T> x) {
#if defined(__x86_64__)
  asm("" : "+v"(x.raw));
#elif defined(__aarch64__)
  asm("" : "+w"(x.raw));
#endif
  return x;
}

// Lane-wise maximum; a NaN in `a` is kept (comparisons with NaN are false).
template <typename T>
C10_ALWAYS_INLINE Vec<T> max(Vec<T> a, Vec<T> b) {
  return Vec<T>::of(b.raw > a.raw ? b.raw : a.raw);
}

// Sum of the lanes, always in the order lane 0, 1, 2, ...
template <typename T>
C10_ALWAYS_INLINE T horizontal_sum(Vec<T> a) {
  T total = a.raw[0];
  for (int64_t lane = 1; lane < kLanes<T>; ++lane) {
    total += a.raw[lane];
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// What csrc/cpu/vectorized_exp.h needs from a vector type (found by argument-dependent lookup).
// ---------------------------------------------------------------------------------------

// x clamped to [lo, hi]; NaN lanes stay NaN.
template <typename T>
C10_ALWAYS_INLINE Vec<T> clamp(Vec<T> x, T lo, T hi) {
  const Vec<T> low(lo), high(hi);
  Vec<T> y = Vec<T>::of(x.raw < low.raw ? low.raw : x.raw);
  return Vec<T>::of(y.raw > high.raw ? high.raw : y.raw);
}

// 2^k for lanes k holding integers in the range of normal exponents: the floating-point
// number with exponent field k + bias and a zero mantissa.
template <typename T>
C10_ALWAYS_INLINE Vec<T> exp2_of_integer(Vec<T> k, int exponent_bias, int mantissa_bits) {
  using Bits = typename Vec<T>::Bits;
  const Bits exponent = (__builtin_convertvector(k.raw, Bits) + exponent_bias) << mantissa_bits;
  typename Vec<T>::Raw result;
  std::memcpy(&result, &exponent, sizeof(result));
  return Vec<T>::of(result);
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
