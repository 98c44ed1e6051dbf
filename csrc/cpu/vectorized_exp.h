// exp() written as plain arithmetic so that the compiler can vectorise loops over it.
//
// The routing softmax takes N_in * N_out exponentials per sample and iteration (11,520 for
// CapsNet); a call to glibc's scalar expf inside the loop keeps the loop from being
// vectorised (glibc's vector variants are only declared under -ffast-math). This version
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

template <typename scalar_t>
inline scalar_t vectorizable_exp(scalar_t x) {
  using C = ExpConstants<scalar_t>;
  using bits_t = typename C::bits_t;
  constexpr scalar_t kLog2e = scalar_t(1.4426950408889634);
  // Clamp (NaN passes through both comparisons and stays NaN in r below).
  x = x < C::kMin ? C::kMin : x;
  x = x > C::kMax ? C::kMax : x;
  const scalar_t k = (x * kLog2e + C::kRoundShift) - C::kRoundShift;  // round(x / ln 2)
  const scalar_t r = (x - k * C::kLn2Hi) - k * C::kLn2Lo;
  // Horner's scheme for sum_{n <= degree} r^n / n!
  scalar_t p = scalar_t(1);
  for (int n = C::kDegree; n >= 1; --n) {
    p = scalar_t(1) + p * (r * (scalar_t(1) / scalar_t(n)));  // 1/n folds to a constant
  }
  // 2^k by building the floating-point exponent directly.
  const bits_t exponent_bits = (static_cast<bits_t>(k) + C::kExponentBias) << C::kMantissaBits;
  return p * __builtin_bit_cast(scalar_t, exponent_bits);
}

}  // namespace cpu
}  // namespace capsnet
