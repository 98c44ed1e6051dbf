// Backward of detach_routing: the couplings are constants, so
//   grad u_hat[j|i] = c_{r-1}[i, j] grad_s_{r-1}[j]
// needs no reverse sweep. Per sample only two vectors (V_{r-1}, the sum of the outputs
// before the last iteration, and grad_s_{r-1}); then one pass per block of input capsules
// over the samples in order, which recomputes the block's predictions (each block of W
// stays in cache for the whole batch), the last couplings, grad u_hat, and grad u and
// grad W from it (gradient_products.h).
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/gradient_products.h"
#include "cpu/kernels/memory.h"
#include "cpu/kernels/predictions.h"
#include "cpu/kernels/routing_steps.h"
#include "cpu/kernels/vec.h"
#include "cpu/kernels/workspace.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// vectors[b] = (grad_s_{r-1}, V_{r-1}) [2, N_out*D_out], and grad_s_sum[b] = grad_s_{r-1}, for
// samples [begin, end). V_{r-1} exactly as the forward accumulated it.
template <typename T>
void detached_sample_vectors(const BackwardProblem<T>& p, int64_t begin, int64_t end, T* workspace) {
  const RoutingShape& shape = p.shape;
  const int64_t r = shape.iterations;
  const int64_t out_size = shape.out_size();
  T* v = workspace;
  for (int64_t b = begin; b < end; ++b) {
    const T* s = p.s_saved + b * r * out_size;
    T* grad_s = p.vectors + b * 2 * out_size;
    T* V = grad_s + out_size;
    fill(V, out_size, T(0));
    for (int64_t t = 0; t + 1 < r; ++t) {
      squash_capsules(s + t * out_size, v, shape.num_out, shape.dim_out);
      add_output(v, V, out_size);
    }
    squash_backward_capsules(s + (r - 1) * out_size, p.grad_v + b * out_size, grad_s, shape.num_out, shape.dim_out);
    copy(grad_s, out_size, p.grad_s_sum + b * out_size);
  }
}

template <typename T>
struct DetachedWorkspace {
  int64_t u_hat_per_sample;  // [N_out*D_out, L] plus padding (see SampleWorkspace)
  T* u_hat;                  // [kSamplesPerTask, u_hat_per_sample]; then grad u_hat in place
  T* u_gathered;             // [kSamplesPerTask, D_in, L]
  T* couplings;              // [N_out, L]
  T* grad_u;                 // [kSamplesPerTask, D_in, L]
  T* grad_W;                 // [N_out*D_out, D_in, L]
  int64_t size;

  DetachedWorkspace(T* base, const RoutingShape& shape) {
    constexpr int64_t kBlock = capsule_block<T>();
    u_hat_per_sample = shape.out_size() * kBlock + 17 * 64 / int64_t(sizeof(T));
    Carver<T> carve(base);
    u_hat = carve.take(kSamplesPerTask * u_hat_per_sample);
    u_gathered = carve.take(kSamplesPerTask * shape.dim_in * kBlock);
    couplings = carve.take(shape.num_out * kBlock);
    grad_u = carve.take(kSamplesPerTask * shape.dim_in * kBlock);
    grad_W = carve.take(shape.out_size() * shape.dim_in * kBlock);
    size = carve.used();
  }
};

// G[k, :] = c[j, :] * grad_s[k] (k = j*D + d), in place of the sample's predictions.
template <typename T>
C10_ALWAYS_INLINE void scale_couplings(const T* c, const T* grad_s, T* G, const RoutingShape& shape) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  for (int64_t j = 0; j < shape.num_out; ++j) {
    Vt c_j[kBlockVectors<T>];
    for (int64_t q = 0; q < kBlockVectors<T>; ++q) {
      c_j[q] = Vt::load(c + j * kBlock + q * kL);
    }
    for (int64_t d = 0; d < shape.dim_out; ++d) {
      const int64_t k = j * shape.dim_out + d;
      const Vt g(grad_s[k]);
      for (int64_t q = 0; q < kBlockVectors<T>; ++q) {
        (c_j[q] * g).store(G + k * kBlock + q * kL);
      }
    }
  }
}

template <typename T, int kDimIn>
void detached_block(const BackwardProblem<T>& p, int64_t block, T* workspace) {
  constexpr int64_t kBlock = capsule_block<T>();
  const RoutingShape& shape = p.shape;
  DetachedWorkspace<T> ws(workspace, shape);
  const InputBlock<T, kDimIn> in(p, block);
  const auto [dim_in, out_size, num_out, blocks, i_begin, width, W] = in;
  const int64_t block_u = dim_in * kBlock;
  const T* prior = p.prior_blocked != nullptr ? p.prior_blocked + block * num_out * kBlock : nullptr;
  const bool first_iteration = shape.iterations == 1;  // the last couplings are c_0
  if (first_iteration) {
    // c_0: the prior's coupling step (as the forward computes it), or uniform.
    if (prior != nullptr) {
      project_block<T, false>(nullptr, nullptr, nullptr, prior, ws.couplings, nullptr, num_out, shape.dim_out);
      coupling_step_block(ws.couplings, num_out, p.options);
    } else {
      fill(ws.couplings, num_out * kBlock, uniform_coupling<T>(num_out, p.options));
    }
  }
  fill(ws.grad_W, out_size * dim_in * kBlock, T(0));
  for (int64_t tile = 0; tile < shape.batch; tile += kSamplesPerTask) {
    const int64_t count = min_of(kSamplesPerTask, shape.batch - tile);
    const T* u[kSamplesPerTask];
    T* u_hat[kSamplesPerTask];
    for (int64_t n = 0; n < count; ++n) {
      copy(p.u_blocked + ((tile + n) * blocks + block) * block_u, block_u, ws.u_gathered + n * block_u);
      u[n] = ws.u_gathered + n * block_u;
      u_hat[n] = ws.u_hat + n * ws.u_hat_per_sample;
    }
    predict_block_of<T, kDimIn, kSamplesPerTask>(count, FirstSums::kNone, W, u, u_hat, nullptr, nullptr, shape);
    for (int64_t n = 0; n < count; ++n) {
      const T* grad_s = p.vectors + (tile + n) * 2 * out_size;
      if (!first_iteration) {
        project_block<T, false>(u_hat[n], grad_s + out_size, nullptr, prior, ws.couplings, nullptr, num_out, shape.dim_out);
        coupling_step_block(ws.couplings, num_out, p.options);
      }
      scale_couplings(ws.couplings, grad_s, u_hat[n], shape);
    }
    gradient_products(
        count, W, ws.u_gathered, block_u, ws.u_hat, ws.u_hat_per_sample, ws.grad_u, ws.grad_W, shape, dim_in,
        [&](int64_t k0, int64_t) { return static_cast<const T*>(ws.u_hat + k0 * kBlock); });
    store_grad_u(ws.grad_u, tile, count, i_begin, width, p.grad_u, shape, dim_in);
  }
  store_grad_W(ws.grad_W, i_begin, width, /*first_chunk=*/true, p.grad_W, shape, dim_in);
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
