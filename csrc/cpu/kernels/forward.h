// Forward of a few samples: predictions, then the routing iterations of each sample.
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

// The routing iterations of sample b (Procedure 1) from its predictions u_hat
// [blocks, N_out*D_out, L]: writes s_saved[b] and v[b], and the last couplings if asked.
//   t = 0, 1, ..: c_t = coupling step of b_t = prior + <u_hat, V_t>   (V_t = v_0 + .. + v_{t-1})
//                 s_t = sum_i c_t u_hat + bias,  v_t = squash(s_t)
// Without a prior, c_0 is the uniform coupling and s_0 = c_0 * sum_i u_hat + bias.
template <typename T>
void route_sample(const ForwardProblem<T>& p, int64_t b, const T* u_hat, SampleWorkspace<T>& ws) {
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
  T* s_all = p.s_saved + b * r * out_size;
  fill(ws.V, out_size, T(0));
  for (int64_t t = 0; t < r; ++t) {
    const bool last = t == r - 1;
    const bool uniform = t == 0 && p.prior_blocked == nullptr;
    T* couplings_out = (last && p.couplings != nullptr) ? p.couplings + b * shape.num_in * num_out : nullptr;
    fill(ws.lane_sums, out_size * kL, T(0));
    for (int64_t block = 0; block < blocks; ++block) {
      const T* u_hat_block = u_hat + block * out_size * kBlock;
      if (uniform) {
        // s_0 = c_0 * (sum over i of u_hat), c_0 the same for every pair.
        for (int64_t k = 0; k < out_size; ++k) {
          Vt acc = Vt::load(ws.lane_sums + k * kL);
          for (int64_t q = 0; q < kNV; ++q) {
            acc += Vt::load(u_hat_block + k * kBlock + q * kL);
          }
          acc.store(ws.lane_sums + k * kL);
        }
        continue;
      }
      const T* prior = p.prior_blocked != nullptr ? p.prior_blocked + block * num_out * kBlock : nullptr;
      block_couplings(u_hat_block, t > 0 ? ws.V : nullptr, prior, ws.couplings, num_out, dim_out, p.options);
      for (int64_t j = 0; j < num_out; ++j) {
        for (int64_t d = 0; d < dim_out; ++d) {
          const int64_t k = j * dim_out + d;
          Vt acc = Vt::load(ws.lane_sums + k * kL);
          for (int64_t q = 0; q < kNV; ++q) {
            acc = fma(Vt::load(ws.couplings + j * kBlock + q * kL), Vt::load(u_hat_block + k * kBlock + q * kL), acc);
          }
          acc.store(ws.lane_sums + k * kL);
        }
      }
      if (couplings_out != nullptr) {
        store_block_couplings(ws.couplings, couplings_out, block, shape);
      }
    }
    T* s = s_all + t * out_size;
    const T scale = uniform ? uniform_coupling<T>(num_out, p.options) : T(1);
    for (int64_t k = 0; k < out_size; ++k) {
      s[k] = scale * horizontal_sum(Vt::load(ws.lane_sums + k * kL)) + (p.bias != nullptr ? p.bias[k] : T(0));
    }
    squash_capsules(s, ws.v, num_out, dim_out);
    if (!last) {
      add_output(ws.v, ws.V, out_size);
    }
    if (uniform && couplings_out != nullptr) {  // r = 1 without a prior
      fill(couplings_out, shape.num_in * num_out, uniform_coupling<T>(num_out, p.options));
    }
  }
  copy(ws.v, out_size, p.v + b * out_size);
}

template <typename T, int kDimIn>
void forward_samples(const ForwardProblem<T>& p, int64_t begin, int64_t end, T* workspace) {
  SampleWorkspace<T> ws(workspace, p.shape);
  predict_samples<T, kDimIn>(p.u_blocked, p.W_blocked, begin, end, ws.u_hat, ws.u_hat_per_sample, p.shape);
  for (int64_t b = begin; b < end; ++b) {
    route_sample(p, b, ws.u_hat + (b - begin) * ws.u_hat_per_sample, ws);
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
