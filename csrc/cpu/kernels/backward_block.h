// Backward phase 2, per block of input capsules, over the samples of a chunk in order:
// rebuild grad u_hat from phase 1's terms, then
//   grad_u[b, i, e] = sum_k W[i, k, e] grad_u_hat[b][k, i]
//   grad_W[i, k, e] = sum_b u[b, i, e] grad_u_hat[b][k, i]      (b in order: deterministic)
//   grad_prior[i, j] = sum_b Gb_0[b][i, j]
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/predictions.h"
#include "cpu/kernels/vec.h"
#include "cpu/kernels/workspace.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// grad_u_hat [N_out*D_out, L] = constant + sum_k plane_k * vector_k for one sample.
template <typename T>
void rebuild_grad_u_hat(
    const T* planes, const T* vectors, int64_t terms, T* grad_u_hat, const RoutingShape& shape) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t out_size = shape.out_size();
  const int64_t plane_size = shape.num_out * kBlock;
  const T* constant = vectors + terms * out_size;
  for (int64_t j = 0; j < shape.num_out; ++j) {
    for (int64_t d = 0; d < shape.dim_out; ++d) {
      const int64_t k = j * shape.dim_out + d;
      Vt acc[kNV];
      for (int64_t q = 0; q < kNV; ++q) {
        acc[q] = Vt(constant[k]);
      }
      for (int64_t term = 0; term < terms; ++term) {
        const Vt x(vectors[term * out_size + k]);
        const T* coefficient = planes + term * plane_size + j * kBlock;
        for (int64_t q = 0; q < kNV; ++q) {
          acc[q] = fma(Vt::load(coefficient + q * kL), x, acc[q]);
        }
      }
      for (int64_t q = 0; q < kNV; ++q) {
        acc[q].store(grad_u_hat + k * kBlock + q * kL);
      }
    }
  }
}

template <typename T, int kDimIn>
void backward_block(
    const BackwardProblem<T>& p, int64_t block, int64_t begin, int64_t end, bool first_chunk, T* workspace) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  const RoutingShape& shape = p.shape;
  BlockWorkspace<T> ws(workspace, shape);
  const int64_t dim_in = dim_in_of<kDimIn>(shape);
  const int64_t out_size = shape.out_size();
  const int64_t num_out = shape.num_out;
  const int64_t blocks = num_capsule_blocks(shape.num_in, kBlock);
  const int64_t i_begin = block * kBlock;
  const int64_t width = min_of(kBlock, shape.num_in - i_begin);
  const int64_t plane_size = num_out * kBlock;
  const int64_t planes = p.terms.planes();
  const T* W = p.W_blocked + block * out_size * dim_in * kBlock;
  fill(ws.grad_W, out_size * dim_in * kBlock, T(0));
  fill(ws.grad_prior, plane_size, T(0));
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n = b - begin;
    const T* sample_planes = p.planes + (n * blocks + block) * planes * plane_size;
    rebuild_grad_u_hat(
        sample_planes, p.vectors + n * p.terms.vectors() * out_size, p.terms.terms, ws.grad_u_hat, shape);
    const T* u = p.u_blocked + (b * blocks + block) * dim_in * kBlock;
    for (int64_t e = 0; e < dim_in; ++e) {
      for (int64_t q = 0; q < kNV; ++q) {
        const int64_t lane0 = q * kL;
        const Vt u_e = Vt::load(u + e * kBlock + lane0);
        Vt grad_u(T(0));
        for (int64_t k = 0; k < out_size; ++k) {
          const Vt g = Vt::load(ws.grad_u_hat + k * kBlock + lane0);
          T* grad_W = ws.grad_W + (k * dim_in + e) * kBlock + lane0;
          grad_u = fma(Vt::load(W + (k * dim_in + e) * kBlock + lane0), g, grad_u);
          fma(u_e, g, Vt::load(grad_W)).store(grad_W);
        }
        grad_u.store(ws.grad_u + e * kBlock + lane0);
      }
    }
    T* grad_u = p.grad_u + (b * shape.num_in + i_begin) * dim_in;
    for (int64_t lane = 0; lane < width; ++lane) {
      for (int64_t e = 0; e < dim_in; ++e) {
        grad_u[lane * dim_in + e] = ws.grad_u[e * kBlock + lane];
      }
    }
    if (p.terms.prior_plane) {
      const T* prior_plane = sample_planes + p.terms.terms * plane_size;
      for (int64_t x = 0; x < plane_size; ++x) {
        ws.grad_prior[x] += prior_plane[x];
      }
    }
  }
  // Into the natural layouts; later chunks add to what the first wrote.
  T* grad_W = p.grad_W + i_begin * out_size * dim_in;
  for (int64_t lane = 0; lane < width; ++lane) {
    for (int64_t k = 0; k < out_size; ++k) {
      for (int64_t e = 0; e < dim_in; ++e) {
        const T value = ws.grad_W[(k * dim_in + e) * kBlock + lane];
        T& target = grad_W[(lane * out_size + k) * dim_in + e];
        target = first_chunk ? value : target + value;
      }
    }
  }
  if (p.grad_prior_blocked != nullptr) {
    T* grad_prior = p.grad_prior_blocked + block * plane_size;
    for (int64_t x = 0; x < plane_size; ++x) {
      grad_prior[x] = first_chunk ? ws.grad_prior[x] : grad_prior[x] + ws.grad_prior[x];
    }
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
