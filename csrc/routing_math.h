// The math of dynamic routing, shared by every backend: the CPU kernels (csrc/cpu), the
// CUDA kernels (csrc/cuda) and the CPU emulation of CUDA (csrc/simt) compile these very
// functions. A routing variant is a change here plus its flag in RoutingOptions; the
// kernels only decide where values live and in which order they are visited.
//
// Everything is C10_HOST_DEVICE and works on scalars, or on one short vector given as an
// accessor `x(d)` (a CUDA thread keeps its vectors in register arrays, the CPU kernels in
// memory), so that each backend keeps its own layout. Arithmetic is in the op-math type
// (float for float16/bfloat16 storage). Equation numbers: Sabour, Frosst & Hinton (2017).
#pragma once

// The CPU kernels compiled once per instruction set (csrc/cpu/kernels/) define
// CAPSNET_ROUTING_MATH_WITHOUT_ATEN: ATen's headers would bring a static initialiser
// (<iostream>'s) into their objects, code that runs at import, before the CPU is checked.
// They compute in float or double and do not need opmath_t.
#ifndef CAPSNET_ROUTING_MATH_WITHOUT_ATEN
#include <ATen/OpMathType.h>
#endif
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace capsnet {

#ifndef CAPSNET_ROUTING_MATH_WITHOUT_ATEN
// Accumulation type of a storage type: float for float16 and bfloat16, else the type itself.
template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;
#endif

// ---------------------------------------------------------------------------------------
// The problem.
// ---------------------------------------------------------------------------------------

// Sizes of one routing call, read off u [B, N_in, D_in] and W [N_in, N_out, D_out, D_in].
struct RoutingShape {
  int64_t batch;       // B
  int64_t num_in;      // N_in (I)
  int64_t num_out;     // N_out (J)
  int64_t dim_out;     // D_out (D)
  int64_t dim_in;      // D_in (E)
  int64_t iterations;  // r

  C10_HOST_DEVICE int64_t out_size() const { return num_out * dim_out; }  // J * D
  C10_HOST_DEVICE int64_t pair_count() const { return num_in * num_out; }  // I * J
};

// The routing variant. Every flag defaults to the paper's MNIST routing.
struct RoutingOptions {
  // Leaky routing (Sec. 7, "none-of-the-above"): each input capsule's softmax has an extra
  // logit fixed at 0 whose coupling is dropped.
  bool leaky = false;
  // Backward only: the couplings of every iteration are constants; gradients flow through
  // the last iteration's weighted sum and squash alone.
  bool detach_routing = false;
};

// Largest num_iterations the op accepts (capsnet/validation.py says the same).
constexpr int64_t kMaxRoutingIterations = int64_t(1) << 16;

// ---------------------------------------------------------------------------------------
// Short vectors.
// ---------------------------------------------------------------------------------------

// Calls body(d) for d = 0 .. dim-1. With kMaxDim > 0 the loop runs to the compile-time
// bound kMaxDim with a guard, so that nvcc unrolls it and a register array indexed by d
// stays in registers; with kMaxDim = 0 it is a plain loop to dim.
template <int kMaxDim, typename Body>
C10_HOST_DEVICE C10_ALWAYS_INLINE void for_each_component(int64_t dim, const Body& body) {
  if constexpr (kMaxDim > 0) {
#pragma unroll
    for (int d = 0; d < kMaxDim; ++d) {
      if (d < dim) {
        body(d);
      }
    }
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      body(d);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Squash (Eq. 1) and its backward, exact for every finite input.
//
//   v = squash(s) = |s|^2 / (1 + |s|^2) * s / |s| = phi(n) s,   n = |s|,  phi(n) = n / (1 + n^2)
//   grad_s = phi grad_v + radial <e, grad_v> e,   e = s / n,  radial = n phi'(n) = phi (2g - 1),
//   g = 1 / (1 + n^2)
// (n phi'(n) = n (1 - n^2) / (1 + n^2)^2 = phi (1 - n^2) g, and n^2 g = 1 - g.)
// Written with the unit vector e and g in [0, 1]. When |s|^2 is a normal number (the common
// case) these are computed directly. Otherwise (|s|^2 overflows float32 from |s| ~ 1.8e19 and
// underflows below ~1e-19; |s| itself may exceed the largest finite value) the capsule is
// first scaled by an exact power of two, s' = s 2^-k with its largest component in [0.5, 1),
// so that |s'| and 1/|s'| are ordinary numbers, and:
//   |s| < 1 (k <= 0): v = (rho / |s'|) s' with rho = |v| = n^2 / (1 + n^2), and phi = n g;
//   |s| large (k > 0): v = rho e, and the gradient is computed times 2^k (phi 2^k = rho / |s'|)
//                      and scaled back once, so that a subnormal result is rounded once.
// squash(0) = 0 with gradient 0; a NaN or infinite component makes the capsule's outputs NaN.
// ---------------------------------------------------------------------------------------

template <typename T>
struct SquashLimits;
template <>
struct SquashLimits<float> {
  static constexpr float kMinNormal = 1.17549435e-38f;
  static constexpr float kMax = 3.40282347e+38f;
};
template <>
struct SquashLimits<double> {
  static constexpr double kMinNormal = 2.2250738585072014e-308;
  static constexpr double kMax = 1.7976931348623157e+308;
};

// With s' = s 2^-exponent and the unit vector e = s' * inv_norm:
//   v(d)      = scale * s'(d)
//   grad_s(d) = 2^out_exponent (tangential * grad_v(d) + radial * <e, grad_v> * e(d)).
// exponent = out_exponent = 0 unless |s|^2 is not a normal number.
template <typename T>
struct SquashCoefficients {
  T scale;
  T inv_norm;
  T tangential;
  T radial;
  int exponent;
  int out_exponent;
};

// Squash coefficients of the capsule s(0..dim-1).
template <int kMaxDim, typename T, typename Component>
C10_HOST_DEVICE inline SquashCoefficients<T> squash_coefficients(const Component& s, int64_t dim) {
  T sq_norm = T(0);
  for_each_component<kMaxDim>(dim, [&](auto d) { sq_norm += T(s(d)) * T(s(d)); });
  if (sq_norm >= SquashLimits<T>::kMinNormal && sq_norm <= SquashLimits<T>::kMax) {
    const T norm = std::sqrt(sq_norm);
    const T phi = norm / (T(1) + sq_norm);
    const T g = T(1) / (T(1) + sq_norm);
    return {phi, T(1) / norm, phi, phi * (T(2) * g - T(1)), 0, 0};
  }
  // |s|^2 overflowed or underflowed, or s is zero, or holds a NaN or an infinity.
  // model-cold-begin (benchmarks/cuda_model.py counts this rare path as not taken)
  T largest = T(0);
  for_each_component<kMaxDim>(dim, [&](auto d) {
    const T a = std::abs(T(s(d)));
    largest = (a > largest || a != a) ? a : largest;  // a NaN stays
  });
  if (largest == T(0)) {
    return {T(0), T(0), T(0), T(0), 0, 0};
  }
  if (!(largest <= SquashLimits<T>::kMax)) {  // NaN or infinite component
    const T nan = std::numeric_limits<T>::quiet_NaN();
    return {nan, nan, nan, nan, 0, 0};
  }
  int exponent = 0;
  std::frexp(largest, &exponent);  // largest in [2^(exponent-1), 2^exponent)
  T scaled_sq_norm = T(0);         // |s'|^2, in [0.25, dim)
  for_each_component<kMaxDim>(dim, [&](auto d) {
    const T x = std::ldexp(T(s(d)), -exponent);  // exact, but where it underflows (negligible)
    scaled_sq_norm += x * x;
  });
  const T scaled_norm = std::sqrt(scaled_sq_norm);
  const T inv_norm = T(1) / scaled_norm;
  const T q = std::ldexp(scaled_sq_norm, 2 * exponent);  // |s|^2: 0 or subnormal, or inf
  const T g = T(1) / (T(1) + q);
  const T rho = q <= T(1) ? q * g : T(1) / (T(1) + T(1) / q);  // |v|
  if (exponent <= 0) {
    const T phi = std::ldexp(scaled_norm, exponent) * g;
    return {rho * inv_norm, inv_norm, phi, phi * (T(2) * g - T(1)), exponent, 0};
  }
  const T phi_scaled = rho * inv_norm;  // phi 2^exponent
  return {rho * inv_norm, inv_norm, phi_scaled, phi_scaled * (T(2) * g - T(1)), exponent, -exponent};
  // model-cold-end
}

// x 2^exponent (exponent is 0 unless |s|^2 is not a normal number).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T squash_rescaled(T x, int exponent) {
  if (exponent == 0) {
    return x;
  }
  // model-cold-begin
  return std::ldexp(x, exponent);
  // model-cold-end
}

// v(d) = squash(s)(d), written through out(d, value). The exponents are tested once per
// capsule, not per component: the loops of the common case have no branch.
template <int kMaxDim, typename T, typename Component, typename Out>
C10_HOST_DEVICE inline void squash_forward(
    const SquashCoefficients<T>& k, const Component& s, int64_t dim, const Out& out) {
  if (k.exponent == 0) {
    for_each_component<kMaxDim>(dim, [&](auto d) { out(d, k.scale * T(s(d))); });
    return;
  }
  // model-cold-begin
  for_each_component<kMaxDim>(
      dim, [&](auto d) { out(d, k.scale * squash_rescaled(T(s(d)), -k.exponent)); });
  // model-cold-end
}

// grad_s(d) from grad_v, written through out(d, value).
template <int kMaxDim, typename T, typename Component, typename Gradient, typename Out>
C10_HOST_DEVICE inline void squash_backward(
    const SquashCoefficients<T>& k, const Component& s, const Gradient& grad_v, int64_t dim, const Out& out) {
  T along = T(0);  // <e, grad_v>
  for_each_component<kMaxDim>(dim, [&](auto d) {
    along += (squash_rescaled(T(s(d)), -k.exponent) * k.inv_norm) * T(grad_v(d));
  });
  const T radial = k.radial * along;
  if (k.exponent == 0 && k.out_exponent == 0) {
    for_each_component<kMaxDim>(dim, [&](auto d) {
      const T unit = T(s(d)) * k.inv_norm;
      out(d, k.tangential * T(grad_v(d)) + radial * unit);
    });
    return;
  }
  // model-cold-begin
  for_each_component<kMaxDim>(dim, [&](auto d) {
    const T unit = squash_rescaled(T(s(d)), -k.exponent) * k.inv_norm;
    const T grad = k.tangential * T(grad_v(d)) + radial * unit;
    out(d, squash_rescaled(grad, k.out_exponent));
  });
  // model-cold-end
}

// ---------------------------------------------------------------------------------------
// The coupling step (Eq. 3): for one input capsule i, the couplings c_ij over the output
// capsules j from the logits b_ij,
//   c_ij = exp(b_ij) / sum_k exp(b_ik)              (softmax over OUTPUT capsules)
//   c_ij = exp(b_ij) / (1 + sum_k exp(b_ik))        (leaky: an extra logit 0, dropped)
// computed max-subtracted so that exp() cannot overflow:
//   m = max(b_i0, .., b_i(J-1) [, 0 if leaky]),  e_j = exp(b_ij - m),
//   c_ij = e_j * (1 / (sum_k e_k [+ exp(-m) if leaky])),  sums in the order k = 0..J-1.
// Backends visit (i, j) in different orders (the CPU kernels vectorise over i, a CUDA thread
// holds one j), so the step is given in its parts, and `exp` is the backend's
// (csrc/cpu/vectorized_exp.h on the CPU, expf/exp on the GPU).
// Backward (the same for both forms: the leaky one is a softmax whose extra coupling
// receives no gradient):  dL/db_ij = c_ij (dL/dc_ij - sum_k c_ik dL/dc_ik).
// ---------------------------------------------------------------------------------------

// Where the running maximum of a row starts: the fixed logit 0 when leaky, else -inf.
template <typename T>
C10_HOST_DEVICE inline T coupling_max_start(const RoutingOptions& options) {
  return options.leaky ? T(0) : -std::numeric_limits<T>::infinity();
}

// Where the row's sum of exponentials starts, given exp(-m) (the fixed logit's term).
template <typename T>
C10_HOST_DEVICE inline T coupling_sum_start(const RoutingOptions& options, T exp_of_minus_max) {
  return options.leaky ? exp_of_minus_max : T(0);
}

// c_ij from e_j = exp(b_ij - m) and the reciprocal of the row's sum.
template <typename T>
C10_HOST_DEVICE inline T coupling_from(T shifted_exp, T inv_sum) {
  return shifted_exp * inv_sum;
}

// The couplings of all-zero logits (the first iteration without a logit prior): exactly
// 1 / J, or 1 / (J + 1) when leaky (exp(0) = 1, and a sum of ones is exact).
template <typename T>
C10_HOST_DEVICE inline T uniform_coupling(int64_t num_out, const RoutingOptions& options) {
  return T(1) / T(num_out + (options.leaky ? 1 : 0));
}

// One whole row, for code that holds it: c[k * stride] from b[k * stride], k = 0..J-1.
template <typename T, typename Exp>
C10_HOST_DEVICE inline void coupling_row(
    const T* logits, T* couplings, int64_t num_out, int64_t stride, const RoutingOptions& options,
    const Exp& exp) {
  T row_max = coupling_max_start<T>(options);
  for (int64_t k = 0; k < num_out; ++k) {
    const T b = logits[k * stride];
    row_max = b > row_max ? b : row_max;
  }
  T total = coupling_sum_start<T>(options, options.leaky ? exp(-row_max) : T(0));
  for (int64_t k = 0; k < num_out; ++k) {
    couplings[k * stride] = exp(logits[k * stride] - row_max);
    total += couplings[k * stride];
  }
  const T inv_total = T(1) / total;
  for (int64_t k = 0; k < num_out; ++k) {
    couplings[k * stride] = coupling_from(couplings[k * stride], inv_total);
  }
}

// dL/db_ij from c_ij, dL/dc_ij and the row's sum_k c_ik dL/dc_ik (summed k = 0..J-1).
template <typename T>
C10_HOST_DEVICE inline T coupling_logit_grad(T coupling, T grad_coupling, T row_dot) {
  return coupling * (grad_coupling - row_dot);
}

}  // namespace capsnet
