// The routing steps the forward and the backward both take, on one block of input
// capsules: the logits and the coupling step (Eq. 3), the weighted sums over the block
// (Eq. 2), the squash of every output capsule (Eq. 1). The math itself is the seam's
// (csrc/routing_math.h); every multiply-add here is an explicit fma() (vec.h), so the
// backward, which calls the same functions, recomputes the forward's couplings bit for bit.
//
// Block layouts: u_hat [N_out*D_out, L], logits/couplings/prior [N_out, L] with
// L = capsule_block<T>() input capsules (kBlockVectors<T> vectors of kLanes<T>).
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/vec.h"
#include "cpu/vectorized_exp.h"
#include "routing_math.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

template <typename T>
constexpr int64_t kBlockVectors = capsule_block<T>() / kLanes<T>;

// Independent multiply-add chains wanted in flight: enough to cover the latency of the
// fused multiply-add units (two units, four cycles, on current x86 cores).
constexpr int64_t kChains = 8;

// Rows j of a block projected at once: kRows * kBlockVectors (* 2 with the gradient)
// independent accumulators.
template <typename T, bool kWithGradient>
constexpr int64_t kProjectionRows = (kBlockVectors<T> * (kWithGradient ? 2 : 1) >= kChains)
    ? 1
    : kChains / (kBlockVectors<T> * (kWithGradient ? 2 : 1));

// For rows j in [j0, j0 + kRows):
//   logits[j, :] = prior[j, :] + sum_d u_hat[j*D + d, :] * V[j*D + d]      (d in order)
//   grad[j, :]   =               sum_d u_hat[j*D + d, :] * G[j*D + d]      (kWithGradient)
// prior null: 0. V null (iteration 0): logits = prior, no agreement term.
template <typename T, bool kWithGradient, int64_t kRows>
C10_ALWAYS_INLINE void project_rows(
    int64_t j0, const T* u_hat, const T* V, const T* G, const T* prior, T* logits, T* grad, int64_t dim_out) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  Vt logit[kRows][kNV];
  Vt gradient[kRows][kNV];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t q = 0; q < kNV; ++q) {
      logit[r][q] = prior != nullptr ? Vt::load(prior + (j0 + r) * kBlock + q * kL) : Vt(T(0));
      gradient[r][q] = Vt(T(0));
    }
  }
  if (V != nullptr || kWithGradient) {
    for (int64_t d = 0; d < dim_out; ++d) {
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t k = (j0 + r) * dim_out + d;
        const Vt v_weight(V != nullptr ? V[k] : T(0));
        const Vt g_weight(kWithGradient ? G[k] : T(0));
        for (int64_t q = 0; q < kNV; ++q) {
          const Vt x = Vt::load(u_hat + k * kBlock + q * kL);
          if (V != nullptr) {
            logit[r][q] = fma(x, v_weight, logit[r][q]);
          }
          if constexpr (kWithGradient) {
            gradient[r][q] = fma(x, g_weight, gradient[r][q]);
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t q = 0; q < kNV; ++q) {
      logit[r][q].store(logits + (j0 + r) * kBlock + q * kL);
      if constexpr (kWithGradient) {
        gradient[r][q].store(grad + (j0 + r) * kBlock + q * kL);
      }
    }
  }
}

// The logits of one block (and, kWithGradient, the projections on G), all rows.
template <typename T, bool kWithGradient>
C10_ALWAYS_INLINE void project_block(
    const T* u_hat, const T* V, const T* G, const T* prior, T* logits, T* grad, int64_t num_out,
    int64_t dim_out) {
  constexpr int64_t kRows = kProjectionRows<T, kWithGradient>;
  int64_t j = 0;
  for (; j + kRows <= num_out; j += kRows) {
    project_rows<T, kWithGradient, kRows>(j, u_hat, V, G, prior, logits, grad, dim_out);
  }
  for (; j < num_out; ++j) {
    project_rows<T, kWithGradient, 1>(j, u_hat, V, G, prior, logits, grad, dim_out);
  }
}

// The coupling step (routing_math.h) in place: c[:, i] from the logits in c[:, i], for every
// input capsule i of the block.
template <typename T>
C10_ALWAYS_INLINE void coupling_step_block(T* c, int64_t num_out, const RoutingOptions& options) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
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

// lane_sums[k, :] += sum over the block's vectors q of weights[j, q] * u_hat[k, q],
// k = j*D + d: one partial sum per lane, of sum_i weights[i, j] u_hat[j|i] (Eq. 2).
template <typename T>
C10_ALWAYS_INLINE void accumulate_weighted_sum(
    const T* weights, const T* u_hat, T* lane_sums, int64_t num_out, int64_t dim_out) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  for (int64_t j = 0; j < num_out; ++j) {
    Vt w[kNV];
    for (int64_t q = 0; q < kNV; ++q) {
      w[q] = Vt::load(weights + j * kBlock + q * kL);
    }
    for (int64_t d = 0; d < dim_out; ++d) {
      const int64_t k = j * dim_out + d;
      Vt acc = Vt::load(lane_sums + k * kL);
      for (int64_t q = 0; q < kNV; ++q) {
        acc = fma(w[q], Vt::load(u_hat + k * kBlock + q * kL), acc);
      }
      acc.store(lane_sums + k * kL);
    }
  }
}

// out[k] = scale * (lane sum of lane_sums[k, :]) + (bias[k] or 0), k < N_out*D_out.
template <typename T>
C10_ALWAYS_INLINE void finish_sums(const T* lane_sums, T scale, const T* bias, T* out, int64_t out_size) {
  constexpr int64_t kL = kLanes<T>;
  for (int64_t k = 0; k < out_size; ++k) {
    out[k] = scale * horizontal_sum(Vec<T>::load(lane_sums + k * kL)) + (bias != nullptr ? bias[k] : T(0));
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
