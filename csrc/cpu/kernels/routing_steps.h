// The routing steps the forward and the backward both take, each in ONE function that both
// call, so that the backward recomputes the forward's couplings and outputs bit for bit:
// the couplings of one block of input capsules (Eq. 3), and the squash of every output
// capsule (Eq. 1). The math itself is the seam's (csrc/routing_math.h).
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/vec.h"
#include "cpu/vectorized_exp.h"
#include "routing_math.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// Vectors per block of input capsules.
template <typename T>
constexpr int64_t kBlockVectors = capsule_block<T>() / kLanes<T>;

// c[j, :] for one block of input capsules, whose logits are
//   b[i, j] = prior[i, j] + <u_hat[j|i], V[j]>     (prior 0 when null, V 0 when null)
// Layouts: u_hat [N_out*D_out, L], V [N_out*D_out], prior and c [N_out, L].
// Not inlined: the forward and the backward must run the very same instructions.
template <typename T>
__attribute__((noinline)) void block_couplings(
    const T* u_hat, const T* V, const T* prior, T* c, int64_t num_out, int64_t dim_out,
    const RoutingOptions& options) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  // Logits, written into c.
  for (int64_t j = 0; j < num_out; ++j) {
    Vt logit[kNV];
    for (int64_t q = 0; q < kNV; ++q) {
      logit[q] = prior != nullptr ? Vt::load(prior + j * kBlock + q * kL) : Vt(T(0));
    }
    if (V != nullptr) {
      for (int64_t d = 0; d < dim_out; ++d) {
        const int64_t k = j * dim_out + d;
        const Vt agreement_weight(V[k]);
        for (int64_t q = 0; q < kNV; ++q) {
          logit[q] = fma(Vt::load(u_hat + k * kBlock + q * kL), agreement_weight, logit[q]);
        }
      }
    }
    for (int64_t q = 0; q < kNV; ++q) {
      logit[q].store(c + j * kBlock + q * kL);
    }
  }
  // The coupling step over j, for every input capsule of the block (routing_math.h).
  for (int64_t q = 0; q < kNV; ++q) {
    T* c_q = c + q * kL;
    Vt row_max(coupling_max_start<T>(options));
    for (int64_t j = 0; j < num_out; ++j) {
      row_max = max(Vt::load(c_q + j * kBlock), row_max);
    }
    Vt total = coupling_sum_start<Vt>(options, options.leaky ? vectorizable_exp(-row_max) : Vt(T(0)));
    for (int64_t j = 0; j < num_out; ++j) {
      const Vt e = vectorizable_exp(Vt::load(c_q + j * kBlock) - row_max);
      e.store(c_q + j * kBlock);
      total += e;
    }
    const Vt inv_total = Vt(T(1)) / total;
    for (int64_t j = 0; j < num_out; ++j) {
      coupling_from(Vt::load(c_q + j * kBlock), inv_total).store(c_q + j * kBlock);
    }
  }
}

// v[j, :] = squash(s[j, :]) for every output capsule j (layouts [N_out*D_out]).
template <typename T>
__attribute__((noinline)) void squash_capsules(const T* s, T* v, int64_t num_out, int64_t dim_out) {
  for (int64_t j = 0; j < num_out; ++j) {
    const T* s_j = s + j * dim_out;
    T* v_j = v + j * dim_out;
    const auto component = [s_j](int64_t d) { return s_j[d]; };
    const SquashCoefficients<T> k = squash_coefficients<0, T>(component, dim_out);
    squash_forward<0>(k, component, dim_out, [v_j](int64_t d, T value) { v_j[d] = value; });
  }
}

// grad_s[j, :] from s[j, :] and grad_v[j, :] for every output capsule j.
template <typename T>
__attribute__((noinline)) void squash_backward_capsules(
    const T* s, const T* grad_v, T* grad_s, int64_t num_out, int64_t dim_out) {
  for (int64_t j = 0; j < num_out; ++j) {
    const T* s_j = s + j * dim_out;
    const T* gv_j = grad_v + j * dim_out;
    T* gs_j = grad_s + j * dim_out;
    const auto component = [s_j](int64_t d) { return s_j[d]; };
    const SquashCoefficients<T> k = squash_coefficients<0, T>(component, dim_out);
    squash_backward<0>(
        k, component, [gv_j](int64_t d) { return gv_j[d]; }, dim_out,
        [gs_j](int64_t d, T value) { gs_j[d] = value; });
  }
}

// The running sum of the outputs, V_{t+1} = V_t + v_t (the logits' agreement weights);
// forward and backward both accumulate it with this, in this order.
template <typename T>
C10_ALWAYS_INLINE void add_output(const T* v, T* V, int64_t out_size) {
  for (int64_t k = 0; k < out_size; ++k) {
    V[k] += v[k];
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
