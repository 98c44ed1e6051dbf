// Backward phase 2, per block of input capsules, over the samples of a chunk in order,
// kGradSamples at a time: rebuild grad u_hat from phase 1's terms, then grad u and grad W
// (gradient_products.h), and grad_prior[i, j] = sum_b Gb_0[b][i, j] (b in order).
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/gradient_products.h"
#include "cpu/kernels/predictions.h"
#include "cpu/kernels/vec.h"
#include "cpu/kernels/workspace.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {


// G[s][k - k0, :] = constant_s[k] + sum_t plane_t[j, :] vector_t[k], j = k / D_out, rows
// [k0, k1), for the samples of a tile: grad u_hat rebuilt from phase 1's terms.
// G [samples, kRowChunk, L]; vectors[s] [N_out*D_out, terms + 1]. kTerms: the number of
// terms as a compile-time constant (the loops over them unrolled, a row's broadcasts shared
// by the block's vectors), or -1 for any.
template <typename T, int kTerms>
C10_ALWAYS_INLINE void rebuild_grad_u_hat(
    int64_t count, int64_t k0, int64_t k1, const T* const* planes, const T* const* vectors, int64_t terms, T* G,
    const RoutingShape& shape) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  constexpr int64_t kMaxTerms = kTerms > 0 ? kTerms : 1;
  const int64_t plane_size = shape.num_out * kBlock;
  const int64_t stride = terms + 1;  // of the interleaved vectors
  for (int64_t s = 0; s < count; ++s) {
    T* out = G + s * kRowChunk * kBlock;
    for (int64_t j = k0 / shape.dim_out; j * shape.dim_out < k1; ++j) {
      const int64_t row_begin = j * shape.dim_out > k0 ? j * shape.dim_out : k0;
      const int64_t row_end = min_of((j + 1) * shape.dim_out, k1);
      if constexpr (kTerms >= 0) {
        const T* coefficient[kMaxTerms];
#pragma GCC unroll 16
        for (int64_t term = 0; term < kTerms; ++term) {
          coefficient[term] = planes[s] + term * plane_size + j * kBlock;
        }
        for (int64_t k = row_begin; k < row_end; ++k) {
          const T* row = vectors[s] + k * (kTerms + 1);
          Vt x[kMaxTerms];
#pragma GCC unroll 16
          for (int64_t term = 0; term < kTerms; ++term) {
            x[term] = Vt(row[term]);
          }
          const Vt c(row[kTerms]);
#pragma GCC unroll 16
          for (int64_t q = 0; q < kNV; ++q) {
            Vt acc = c;
#pragma GCC unroll 16
            for (int64_t term = 0; term < kTerms; ++term) {
              acc = fma(Vt::load(coefficient[term] + q * kL), x[term], acc);
            }
            acc.store(out + (k - k0) * kBlock + q * kL);
          }
        }
      } else {
        for (int64_t k = row_begin; k < row_end; ++k) {
          const T* row = vectors[s] + k * stride;
          for (int64_t q = 0; q < kNV; ++q) {
            Vt acc(row[terms]);
            for (int64_t term = 0; term < terms; ++term) {
              acc = fma(Vt::load(planes[s] + term * plane_size + j * kBlock + q * kL), Vt(row[term]), acc);
            }
            acc.store(out + (k - k0) * kBlock + q * kL);
          }
        }
      }
    }
  }
}

// rebuild_grad_u_hat with the number of terms as a constant where it is a common one
// (2 (r - 1), + 1 with a prior, for r <= 4; 0 and 1 for detach_routing).
template <typename T>
C10_ALWAYS_INLINE void rebuild_grad_u_hat_any(
    int64_t count, int64_t k0, int64_t k1, const T* const* planes, const T* const* vectors, int64_t terms, T* G,
    const RoutingShape& shape) {
#define CAPSNET_REBUILD_CASE(n) \
  case n:                       \
    rebuild_grad_u_hat<T, n>(count, k0, k1, planes, vectors, terms, G, shape); \
    return;
  switch (terms) {
    CAPSNET_REBUILD_CASE(0)
    CAPSNET_REBUILD_CASE(1)
    CAPSNET_REBUILD_CASE(2)
    CAPSNET_REBUILD_CASE(3)
    CAPSNET_REBUILD_CASE(4)
    CAPSNET_REBUILD_CASE(5)
    CAPSNET_REBUILD_CASE(6)
    CAPSNET_REBUILD_CASE(7)
    default:
      rebuild_grad_u_hat<T, -1>(count, k0, k1, planes, vectors, terms, G, shape);
  }
#undef CAPSNET_REBUILD_CASE
}

template <typename T, int kDimIn>
void backward_block(
    const BackwardProblem<T>& p, int64_t block, int64_t begin, int64_t end, bool first_chunk, T* workspace) {
  constexpr int64_t kBlock = capsule_block<T>();
  const RoutingShape& shape = p.shape;
  BlockWorkspace<T> ws(workspace, shape);
  const InputBlock<T, kDimIn> in(p, block);
  const auto [dim_in, out_size, num_out, blocks, i_begin, width, W] = in;
  const int64_t plane_size = num_out * kBlock;
  const int64_t planes = p.terms.planes();
  const int64_t u_stride = blocks * dim_in * kBlock;  // from one sample's block to the next's
  fill(ws.grad_W, out_size * dim_in * kBlock, T(0));
  fill(ws.grad_prior, plane_size, T(0));
  const int64_t sample_terms = planes * plane_size;  // one sample's planes of this block
  const T* block_planes = p.planes + block * p.chunk_samples * sample_terms;
  for (int64_t tile = begin; tile < end; tile += kGradSamples) {
    const int64_t count = min_of(kGradSamples, end - tile);
    const T* sample_planes[kGradSamples];
    const T* sample_vectors[kGradSamples];
    // The planes of the tile's samples are contiguous; those of the next tile are read
    // next: ask for them now.
    const int64_t n0 = tile - begin;
    const int64_t next_count = min_of(kGradSamples, end - tile - count);
    prefetch_range(block_planes + (n0 + count) * sample_terms, block_planes + (n0 + count + next_count) * sample_terms);
    for (int64_t s = 0; s < count; ++s) {
      sample_planes[s] = block_planes + (n0 + s) * sample_terms;
      sample_vectors[s] = p.vectors + (n0 + s) * p.terms.vectors() * out_size;
      if (p.terms.prior_plane) {
        const T* prior_plane = sample_planes[s] + p.terms.terms * plane_size;
        for (int64_t x = 0; x < plane_size; ++x) {
          ws.grad_prior[x] += prior_plane[x];
        }
      }
    }
    const T* u = p.u_blocked + (tile * blocks + block) * dim_in * kBlock;
    gradient_products(
        count, W, u, u_stride, ws.grad_u_hat, kRowChunk * kBlock, ws.grad_u, ws.grad_W, shape, dim_in,
        [&](int64_t k0, int64_t k1) {
          rebuild_grad_u_hat_any(count, k0, k1, sample_planes, sample_vectors, p.terms.terms, ws.grad_u_hat, shape);
          return static_cast<const T*>(ws.grad_u_hat);
        });
    store_grad_u(ws.grad_u, tile, count, i_begin, width, p.grad_u, shape, dim_in);
  }
  store_grad_W(ws.grad_W, i_begin, width, first_chunk, p.grad_W, shape, dim_in);
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
