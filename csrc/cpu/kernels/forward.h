// Forward of a few samples: predictions (with the first iteration's weighted sums), then the
// remaining routing iterations of each sample.
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

// Writes the couplings block c [N_out, L] into couplings [N_in, N_out] of one sample.
template <typename T>
void store_block_couplings(const T* c, T* couplings, int64_t block, const RoutingShape& shape) {
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t i_begin = block * kBlock;
  const int64_t width = min_of(kBlock, shape.num_in - i_begin);
  for (int64_t lane = 0; lane < width; ++lane) {
    for (int64_t j = 0; j < shape.num_out; ++j) {
      couplings[(i_begin + lane) * shape.num_out + j] = c[j * kBlock + lane];
    }
  }
}

// The first iteration's couplings c_0 of every block, the same for every sample: the
// coupling step of the prior (null without a prior: the uniform coupling).
template <typename T>
const T* first_couplings(const T* prior_blocked, T* out, const RoutingShape& shape, const RoutingOptions& options) {
  if (prior_blocked == nullptr) {
    return nullptr;
  }
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t plane = shape.num_out * kBlock;
  for (int64_t block = 0; block < num_capsule_blocks(shape.num_in, kBlock); ++block) {
    project_block<T, false>(
        nullptr, nullptr, nullptr, prior_blocked + block * plane, out + block * plane, nullptr, shape.num_out,
        shape.dim_out);
    coupling_step_block(out + block * plane, shape.num_out, options);
  }
  return out;
}

// The routing iterations of sample b (Procedure 1) after the first, from its predictions
// u_hat [blocks, N_out*D_out, L] and the first iteration's lane sums; writes s_saved[b]
// and v[b], and the last couplings if asked.
//   t = 0, 1, ..: c_t = coupling step of b_t = prior + <u_hat, V_t>   (V_t = v_0 + .. + v_{t-1})
//                 s_t = sum_i c_t u_hat + bias,  v_t = squash(s_t)
// Without a prior, c_0 is the uniform coupling and s_0 = c_0 * sum_i u_hat + bias.
template <typename T>
void route_sample(
    const ForwardProblem<T>& p, int64_t b, const T* u_hat, const T* c0, T* first_lane_sums, SampleWorkspace<T>& ws) {
  constexpr int64_t kBlock = capsule_block<T>();
  const RoutingShape& shape = p.shape;
  const int64_t r = shape.iterations;
  const int64_t num_out = shape.num_out;
  const int64_t dim_out = shape.dim_out;
  const int64_t out_size = shape.out_size();
  const int64_t plane = num_out * kBlock;
  const int64_t blocks = num_capsule_blocks(shape.num_in, kBlock);
  T* s_all = p.s_saved + b * r * out_size;
  T* couplings_out = p.couplings != nullptr ? p.couplings + b * shape.num_in * num_out : nullptr;
  fill(ws.V, out_size, T(0));
  for (int64_t t = 0; t < r; ++t) {
    const bool last = t == r - 1;
    T* lane_sums = t == 0 ? first_lane_sums : ws.lane_sums;
    if (t > 0) {
      fill(lane_sums, out_size * kLanes<T>, T(0));
      for (int64_t block = 0; block < blocks; ++block) {
        const T* u_hat_block = u_hat + block * out_size * kBlock;
        const T* prior = p.prior_blocked != nullptr ? p.prior_blocked + block * plane : nullptr;
        project_block<T, false>(u_hat_block, ws.V, nullptr, prior, ws.couplings, nullptr, num_out, dim_out);
        coupling_step_block(ws.couplings, num_out, p.options);
        accumulate_weighted_sum(ws.couplings, u_hat_block, lane_sums, num_out, dim_out);
        if (last && couplings_out != nullptr) {
          store_block_couplings(ws.couplings, couplings_out, block, shape);
        }
      }
    } else if (last && couplings_out != nullptr) {  // r = 1
      for (int64_t block = 0; block < blocks; ++block) {
        if (c0 != nullptr) {
          store_block_couplings(c0 + block * plane, couplings_out, block, shape);
        } else {
          fill(ws.couplings, plane, uniform_coupling<T>(num_out, p.options));
          store_block_couplings(ws.couplings, couplings_out, block, shape);
        }
      }
    }
    T* s = s_all + t * out_size;
    const T scale = (t == 0 && c0 == nullptr) ? uniform_coupling<T>(num_out, p.options) : T(1);
    finish_sums(lane_sums, scale, p.bias, s, out_size);
    squash_capsules(s, ws.v, num_out, dim_out);
    if (!last) {
      add_output(ws.v, ws.V, out_size);
    }
  }
  copy(ws.v, out_size, p.v + b * out_size);
}

template <typename T, int kDimIn>
void forward_samples(const ForwardProblem<T>& p, int64_t begin, int64_t end, T* workspace) {
  SampleWorkspace<T> ws(workspace, p.shape);
  const int64_t out_size = p.shape.out_size();
  const T* c0 = first_couplings(p.prior_blocked, ws.first_couplings, p.shape, p.options);
  fill(ws.first_lane_sums, kSamplesPerTask * out_size * kLanes<T>, T(0));
  const FirstIteration<T> first{c0, ws.first_lane_sums};
  predict_samples<T, kDimIn>(p.u_blocked, p.W_blocked, begin, end, ws.u_hat, ws.u_hat_per_sample, ws.u_gathered, p.shape, &first);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n = b - begin;
    route_sample(
        p, b, ws.u_hat + n * ws.u_hat_per_sample, c0, ws.first_lane_sums + n * out_size * kLanes<T>, ws);
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
