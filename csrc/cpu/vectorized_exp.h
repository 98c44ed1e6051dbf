// exp() of a whole vector register, written as plain arithmetic.
//
// The routing softmax takes N_in * N_out exponentials per sample and iteration (11,520 for
// CapsNet); glibc's expf is scalar (its vector variants are only declared under
// -ffast-math), and its result could differ between instruction sets. This version
// is the textbook range reduction exp(x) = 2^k exp(r), x = k ln2 + r, |r| <= ln2/2, with
// a Taylor polynomial for exp(r): truncation error r^8/8! < 6e-9 (float, degree 7) and
// r^13/13! < 2e-17 (double, degree 12), below each type's rounding. It is accurate to a
// few ulp, deterministic, and propagates NaN.
#pragma once

#include <cstdint>

namespace capsnet {
namespace cpu {

template <typename scalar_t>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using bits_t = int32_t;
  static constexpr float kMin = -87.0f;  // exp(-87) ~ 1.6e-38, the smallest normal float range
  static constexpr float kMax = 88.0f;   // exp(88) ~ 1.7e38, below FLT_MAX
  static constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so that k * kLn2Hi is exact
  static constexpr float kLn2Lo = 1.428606765330187e-06f;
  static constexpr int kExponentBias = 127;
  static constexpr int kMantissaBits = 23;
  static constexpr int kDegree = 7;
};

template <>
struct ExpConstants<double> {
  using bits_t = int64_t;
  static constexpr double kMin = -708.0;
  static constexpr double kMax = 709.0;
  static constexpr double kRoundShift = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0.6931471803691238;
  static constexpr double kLn2Lo = 1.9082149292705877e-10;
  static constexpr int kExponentBias = 1023;
  static constexpr int kMantissaBits = 52;
  static constexpr int kDegree = 12;
};

// 1 / n! for n = 0 .. kDegree, each rounded once to T (computed at compile time).
template <typename T, int kDegree>
struct InverseFactorials {
  T value[kDegree + 1];
};

template <typename T, int kDegree>
constexpr InverseFactorials<T, kDegree> inverse_factorials() {
  InverseFactorials<T, kDegree> result{};
  long double factorial = 1;
  for (int n = 0; n <= kDegree; ++n) {
    factorial *= n > 0 ? n : 1;
    result.value[n] = static_cast<T>(1.0L / factorial);
  }
  return result;
}

// exp of every lane of x. V is a vector type with element_type float or double that
// provides, by argument-dependent lookup, fma(a, b, c) (a * b + c), clamp(x, lo, hi) (NaN
// stays NaN) and exp2_of_integer(k, exponent_bias, mantissa_bits) (2^k for integral lanes
// k); see csrc/cpu/kernels/vec.h.
template <typename V>
inline V vectorizable_exp(V x) {
  using scalar_t = typename V::element_type;
  using C = ExpConstants<scalar_t>;
  const V round_shift(C::kRoundShift);
  x = clamp(x, C::kMin, C::kMax);
  const V k = fma(x, V(scalar_t(1.4426950408889634)), round_shift) - round_shift;  // round(x / ln 2)
  const V r = fma(-k, V(C::kLn2Lo), fma(-k, V(C::kLn2Hi), x));
  // Horner's scheme for sum_{n <= degree} r^n / n!
  constexpr InverseFactorials<scalar_t, C::kDegree> coefficient = inverse_factorials<scalar_t, C::kDegree>();
  V p(coefficient.value[C::kDegree]);
  for (int n = C::kDegree - 1; n >= 0; --n) {
    p = fma(p, r, V(coefficient.value[n]));
  }
  return p * exp2_of_integer(k, C::kExponentBias, C::kMantissaBits);
}

}  // namespace cpu
}  // namespace capsnet
