// The predictions u_hat[j|i] = W[i, j] u[i] (Eq. 2) of a few samples, block by block.
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/routing_steps.h"
#include "cpu/kernels/vec.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// Samples whose predictions share one sweep over W: each vector of W loaded is used for
// all of them.
constexpr int64_t kSamplesPerTask = 2;

// D_in as a compile-time constant for the CapsNet shape (8), so that the sum over it is
// unrolled; 0 = known at run time only.
template <int kDimIn>
C10_ALWAYS_INLINE int64_t dim_in_of(const RoutingShape& shape) {
  return kDimIn > 0 ? kDimIn : shape.dim_in;
}

// u_hat of kCount samples for one block of input capsules:
//   u_hat[n][k, :] = sum_e W[k, e, :] u[n][e, :],  k = j*D_out + d,
// from the block's W [N_out*D_out, D_in, L] and inputs u[n] [D_in, L], into u_hat[n]
// [N_out*D_out, L]. Every element is the same chain of multiply-adds over e whatever
// kCount is, so that forward and backward (and any tiling) predict bitwise alike.
template <typename T, int kDimIn, int kCount>
C10_ALWAYS_INLINE void predict_block(
    const T* W, const T* const* u, T* const* u_hat, const RoutingShape& shape) {
  using Vt = Vec<T>;
  constexpr int64_t kL = kLanes<T>;
  constexpr int64_t kNV = kBlockVectors<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t dim_in = dim_in_of<kDimIn>(shape);
  const int64_t out_size = shape.out_size();
  for (int64_t k = 0; k < out_size; ++k) {
    const T* W_k = W + k * dim_in * kBlock;
    Vt acc[kCount][kNV];
    for (int n = 0; n < kCount; ++n) {
      for (int64_t q = 0; q < kNV; ++q) {
        acc[n][q] = Vt(T(0));
      }
    }
    for (int64_t e = 0; e < dim_in; ++e) {
      for (int64_t q = 0; q < kNV; ++q) {
        const Vt w = Vt::load(W_k + e * kBlock + q * kL);
        for (int n = 0; n < kCount; ++n) {
          acc[n][q] = fma(w, Vt::load(u[n] + e * kBlock + q * kL), acc[n][q]);
        }
      }
    }
    for (int n = 0; n < kCount; ++n) {
      for (int64_t q = 0; q < kNV; ++q) {
        acc[n][q].store(u_hat[n] + k * kBlock + q * kL);
      }
    }
  }
}

// u_hat [blocks, N_out*D_out, L] of samples [begin, end) (at most kSamplesPerTask), into
// u_hat + (b - begin) * per_sample.
template <typename T, int kDimIn>
void predict_samples(
    const T* u_blocked, const T* W_blocked, int64_t begin, int64_t end, T* u_hat, int64_t per_sample,
    const RoutingShape& shape) {
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t dim_in = dim_in_of<kDimIn>(shape);
  const int64_t blocks = num_capsule_blocks(shape.num_in, kBlock);
  const int64_t block_W = shape.out_size() * dim_in * kBlock;
  const int64_t block_u = dim_in * kBlock;
  const int64_t block_u_hat = shape.out_size() * kBlock;
  const int64_t count = end - begin;
  for (int64_t block = 0; block < blocks; ++block) {
    const T* u[kSamplesPerTask];
    T* out[kSamplesPerTask];
    for (int64_t n = 0; n < count; ++n) {
      u[n] = u_blocked + ((begin + n) * blocks + block) * block_u;
      out[n] = u_hat + n * per_sample + block * block_u_hat;
    }
    const T* W = W_blocked + block * block_W;
    static_assert(kSamplesPerTask == 2, "update the dispatch on count below");
    if (count == 2) {
      predict_block<T, kDimIn, 2>(W, u, out, shape);
    } else {
      predict_block<T, kDimIn, 1>(W, u, out, shape);
    }
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
