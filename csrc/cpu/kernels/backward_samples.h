// Backward phase 1, per sample: recompute the predictions and the couplings, sweep the
// iterations in reverse, and write the coefficients and vectors of grad u_hat (see
// BackwardTerms in kernel_interface.h) for phase 2.
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/predictions.h"
#include "cpu/kernels/routing_steps.h"
#include "cpu/kernels/vec.h"
#include "cpu/kernels/workspace.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// Where phase 1 writes the terms of one sample.
template <typename T>
struct SampleTerms {
  T* planes;   // the sample's planes of block 0: [planes, N_out, L], then every block_stride
  T* vectors;  // [N_out*D_out, terms + 1]
  int64_t block_stride;
  int64_t plane_size;  // N_out * L
  int64_t vector_count;  // terms + 1

  // vector `index` (the constant: index terms) = values [N_out*D_out]
  void set_vector(int64_t index, const T* values, int64_t out_size) const {
    for (int64_t k = 0; k < out_size; ++k) {
      vectors[k * vector_count + index] = values[k];
    }
  }

  T* plane(int64_t block, int64_t index) const {
    return planes + block * block_stride + index * plane_size;
  }
};

// The reverse sweep for sample b. With Gb_t = sum_{t' >= t} dL/db_t' (dL/db_t = 0 where the
// logits are constant):
//   grad_s_t     = squash backward of grad_v_t   (grad_v_{r-1} = the incoming grad_v)
//   dL/db_t      = coupling_logit_grad(c_t, <u_hat, grad_s_t>)
//   grad_v_{t-1} = sum_i Gb_t u_hat       (v_{t-1} enters every b_t' with t' >= t)
// and the terms of grad u_hat: (c_t, grad_s_t), (Gb_t, v_{t-1}); the prior's gradient is Gb_0.
template <typename T>
void backward_sample(
    const BackwardProblem<T>& p, int64_t b, const T* u_hat, const SampleTerms<T>& out, SampleWorkspace<T>& ws) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  const RoutingShape& shape = p.shape;
  const int64_t r = shape.iterations;
  const int64_t num_out = shape.num_out;
  const int64_t dim_out = shape.dim_out;
  const int64_t out_size = shape.out_size();
  const int64_t blocks = num_capsule_blocks(shape.num_in, kBlock);
  const bool has_prior = p.prior_blocked != nullptr;
  const T* s = p.s_saved + b * r * out_size;
  T* grad_s_sum = p.grad_s_sum + b * out_size;

  // v_t and V_t exactly as the forward computed them from the same s_t.
  fill(ws.sums, out_size, T(0));  // V_0
  for (int64_t t = 0; t + 1 < r; ++t) {
    squash_capsules(s + t * out_size, ws.outputs + t * out_size, num_out, dim_out);
    copy(ws.sums + t * out_size, out_size, ws.sums + (t + 1) * out_size);
    add_output(ws.outputs + t * out_size, ws.sums + (t + 1) * out_size, out_size);
  }
  const auto prior_of = [&](int64_t block) {
    return has_prior ? p.prior_blocked + block * num_out * kBlock : nullptr;
  };
  fill(ws.V, out_size, T(0));
  out.set_vector(p.terms.terms, ws.V, out_size);  // the constant: 0 unless set below

  copy(p.grad_v + b * out_size, out_size, ws.grad_v);
  fill(grad_s_sum, out_size, T(0));
  for (int64_t t = r - 1; t >= 0; --t) {
    squash_backward_capsules(s + t * out_size, ws.grad_v, ws.grad_s, num_out, dim_out);
    for (int64_t k = 0; k < out_size; ++k) {
      grad_s_sum[k] += ws.grad_s[k];
    }
    if (t == 0 && !has_prior) {
      // c_0 is the uniform coupling: its term is a constant.
      const T c0 = uniform_coupling<T>(num_out, p.options);
      for (int64_t k = 0; k < out_size; ++k) {
        ws.V[k] = c0 * ws.grad_s[k];
      }
      out.set_vector(p.terms.terms, ws.V, out_size);
      break;
    }
    const T* V_t = t > 0 ? ws.sums + t * out_size : nullptr;
    const int64_t c_term = 2 * (r - 1 - t);  // see BackwardTerms
    out.set_vector(c_term, ws.grad_s, out_size);
    // Gb_t (or, at t = 0, the prior's gradient) = Gb_{t+1} + dL/db_t, Gb_r = 0.
    const int64_t gb_index = t > 0 ? c_term + 1 : p.terms.terms;
    const int64_t gb_next_index = c_term - 1;  // Gb_{t+1}, when t + 1 < r
    fill(ws.lane_sums, out_size * kL, T(0));
    for (int64_t block = 0; block < blocks; ++block) {
      const T* u_hat_block = u_hat + block * out_size * kBlock;
      T* c = out.plane(block, c_term);
      // The logits exactly as the forward computed them, and dL/dc[i, j] = <u_hat[j|i], grad_s_t[j]>.
      project_block<T, true>(u_hat_block, V_t, ws.grad_s, prior_of(block), c, ws.grad_couplings, num_out, dim_out);
      coupling_step_block(c, num_out, p.options);
      T* Gb = out.plane(block, gb_index);
      const T* Gb_next = t + 1 < r ? out.plane(block, gb_next_index) : nullptr;
      for (int64_t q = 0; q < kNV; ++q) {
        const int64_t lane0 = q * kL;
        Vt row_dot(T(0));
        for (int64_t j = 0; j < num_out; ++j) {
          row_dot = fma(Vt::load(c + j * kBlock + lane0), Vt::load(ws.grad_couplings + j * kBlock + lane0), row_dot);
        }
        for (int64_t j = 0; j < num_out; ++j) {
          const Vt grad_logit = coupling_logit_grad(
              Vt::load(c + j * kBlock + lane0), Vt::load(ws.grad_couplings + j * kBlock + lane0), row_dot);
          const Vt previous = Gb_next != nullptr ? Vt::load(Gb_next + j * kBlock + lane0) : Vt(T(0));
          (previous + grad_logit).store(Gb + j * kBlock + lane0);
        }
      }
      if (t > 0) {
        // grad v_{t-1} = sum_i Gb_t u_hat, lane-wise sums over the blocks first.
        accumulate_weighted_sum(Gb, u_hat_block, ws.lane_sums, num_out, dim_out);
      }
    }
    if (t > 0) {
      out.set_vector(c_term + 1, ws.outputs + (t - 1) * out_size, out_size);
      finish_sums(ws.lane_sums, T(1), static_cast<const T*>(nullptr), ws.grad_v, out_size);
    }
  }
}

template <typename T, int kDimIn>
void backward_samples(const BackwardProblem<T>& p, int64_t chunk_begin, int64_t begin, int64_t end, T* workspace) {
  constexpr int64_t kBlock = capsule_block<T>();
  SampleWorkspace<T> ws(workspace, p.shape);
  predict_samples<T, kDimIn>(p.u_blocked, p.W_blocked, begin, end, ws.u_hat, ws.u_hat_per_sample, ws.u_gathered, p.shape);
  const int64_t plane_size = p.shape.num_out * kBlock;
  const int64_t planes = p.terms.planes();
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n = b - chunk_begin;
    const SampleTerms<T> out{
        p.planes + n * planes * plane_size, p.vectors + n * p.terms.vectors() * p.shape.out_size(),
        p.chunk_samples * planes * plane_size, plane_size, p.terms.vectors()};
    backward_sample(p, b, ws.u_hat + (b - begin) * ws.u_hat_per_sample, out, ws);
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
