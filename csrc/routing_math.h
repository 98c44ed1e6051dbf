// Math shared by the CPU and CUDA routing kernels (and by the CPU emulation of CUDA).
//
// Everything here is a pure function of a few scalars or of one short vector, marked
// C10_HOST_DEVICE so that the CPU kernel, the CUDA kernels and the emulator compile the
// very same expressions. Equation numbers refer to Sabour, Frosst & Hinton (2017).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace capsnet {

// squash(s) = |s|^2 / (1 + |s|^2) * s / |s|            (Eq. 1)
//           = s * f(q),  q = |s|^2,  f(q) = sqrt(q) / (1 + q).
// Written with f so that squash(0) = 0 exactly instead of 0/0.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t squash_scale(scalar_t sq_norm) {
  return std::sqrt(sq_norm) / (scalar_t(1) + sq_norm);
}

// Backward of v = s * f(|s|^2):
//   dv/ds = f(q) I + 2 f'(q) s s^T,   2 f'(q) = (1 - q) / (sqrt(q) (1 + q)^2),
// so  grad_s = f(q) grad_v + 2 f'(q) (s . grad_v) s.
// The second coefficient diverges like 1/|s| at s = 0 but multiplies (s . grad_v) s, which
// vanishes like |s|^2: the limit is 0, and we return 0 there so that the gradient of squash
// at the zero vector is exactly 0 (never NaN), matching the reference's autograd.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t squash_grad_outer_coeff(scalar_t sq_norm) {
  if (!(sq_norm > scalar_t(0))) {
    // Zero vector (or NaN, which then propagates through the first term).
    return scalar_t(0);
  }
  const scalar_t one_plus = scalar_t(1) + sq_norm;
  return (scalar_t(1) - sq_norm) / (std::sqrt(sq_norm) * one_plus * one_plus);
}

// Softmax over one row of routing logits (Eq. 3: over the OUTPUT capsules of one input
// capsule), max-subtracted so that large agreements cannot overflow exp().
template <typename scalar_t>
C10_HOST_DEVICE inline void softmax_row(const scalar_t* logits, scalar_t* coupling, int n) {
  scalar_t row_max = logits[0];
  for (int k = 1; k < n; ++k) {
    row_max = logits[k] > row_max ? logits[k] : row_max;
  }
  scalar_t total = scalar_t(0);
  for (int k = 0; k < n; ++k) {
    coupling[k] = std::exp(logits[k] - row_max);
    total += coupling[k];
  }
  const scalar_t inv_total = scalar_t(1) / total;
  for (int k = 0; k < n; ++k) {
    coupling[k] *= inv_total;
  }
}

// Backward of c = softmax(b) for one row:  grad_b[k] = c[k] (grad_c[k] - sum_m c[m] grad_c[m]).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t softmax_row_dot(const scalar_t* coupling, const scalar_t* grad_c, int n) {
  scalar_t dot = scalar_t(0);
  for (int k = 0; k < n; ++k) {
    dot += coupling[k] * grad_c[k];
  }
  return dot;
}

}  // namespace capsnet
