// The products that give grad u and grad W from grad u_hat, for one block of input
// capsules and a tile of samples (backward phase 2, full and detach_routing):
//   grad_u[b, i, e] = sum_k W[i, k, e] grad_u_hat[b][k, i]                 (k in order)
//   grad_W[i, k, e] += sum_b u[b, i, e] grad_u_hat[b][k, i]                (b in order)
// Small matrix products per input capsule, vectorised over the block's capsules, with
// register tiles sized for the variant's register file.
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/tile_transpose.h"
#include "cpu/kernels/memory.h"
#include "cpu/kernels/routing_steps.h"
#include "cpu/kernels/vec.h"
#include "cpu/kernels/workspace.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// Register tiles (rows x columns of accumulators):
//   grad_u: samples x components e       grad_W: rows k x components e
constexpr int64_t kGradUSamples = 2;
constexpr int64_t kGradUColumns = kVectorRegisters >= 32 ? 8 : 4;
constexpr int64_t kGradWRows = kVectorRegisters >= 32 ? 4 : 2;
constexpr int64_t kGradWColumns = 4;

// grad_u[s][e, q] += sum_{k < rows} W[k, e, q] G[s][k, q] for samples [s0, s0 + kS),
// components [e0, e0 + kE), vector q (pointers W_q, G_q, grad_u_q at its offset);
// G [samples, rows, L] with samples g_stride elements apart, grad_u [samples, D_in, L].
template <typename T, int64_t kS, int64_t kE>
C10_ALWAYS_INLINE void grad_u_tile(
    int64_t s0, int64_t e0, int64_t rows, const T* W_q, const T* G_q, int64_t g_stride, T* grad_u_q,
    int64_t dim_in) {
  using Vt = Vec<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  Vt acc[kS][kE];
#pragma GCC unroll 16
  for (int64_t s = 0; s < kS; ++s) {
#pragma GCC unroll 16
    for (int64_t e = 0; e < kE; ++e) {
      acc[s][e] = Vt::load(grad_u_q + ((s0 + s) * dim_in + e0 + e) * kBlock);
    }
  }
  for (int64_t k = 0; k < rows; ++k) {
    Vt g[kS];
#pragma GCC unroll 16
    for (int64_t s = 0; s < kS; ++s) {
      g[s] = in_register(Vt::load(G_q + (s0 + s) * g_stride + k * kBlock));
    }
#pragma GCC unroll 16
    for (int64_t e = 0; e < kE; ++e) {
      const Vt w = in_register(Vt::load(W_q + (k * dim_in + e0 + e) * kBlock));
#pragma GCC unroll 16
      for (int64_t s = 0; s < kS; ++s) {
        acc[s][e] = fma(w, g[s], acc[s][e]);
      }
    }
  }
#pragma GCC unroll 16
  for (int64_t s = 0; s < kS; ++s) {
#pragma GCC unroll 16
    for (int64_t e = 0; e < kE; ++e) {
      acc[s][e].store(grad_u_q + ((s0 + s) * dim_in + e0 + e) * kBlock);
    }
  }
}

// grad_W[k, e, q] += sum_s u[s][e, q] G[s][k, q] over the tile's `count` samples, for rows
// [k0, k0 + kK), components [e0, e0 + kE), vector q (pointers at its offset); u [samples]
// [D_in, L] (u_stride apart), G as for grad_u_tile.
template <typename T, int64_t kK, int64_t kE>
C10_ALWAYS_INLINE void grad_W_tile(
    int64_t k0, int64_t e0, int64_t count, const T* u_q, int64_t u_stride, const T* G_q, int64_t g_stride,
    T* grad_W_q, int64_t dim_in) {
  using Vt = Vec<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  Vt acc[kK][kE];
#pragma GCC unroll 16
  for (int64_t k = 0; k < kK; ++k) {
#pragma GCC unroll 16
    for (int64_t e = 0; e < kE; ++e) {
      acc[k][e] = Vt::load(grad_W_q + ((k0 + k) * dim_in + e0 + e) * kBlock);
    }
  }
  for (int64_t s = 0; s < count; ++s) {
    Vt x[kE];
#pragma GCC unroll 16
    for (int64_t e = 0; e < kE; ++e) {
      x[e] = in_register(Vt::load(u_q + s * u_stride + (e0 + e) * kBlock));
    }
#pragma GCC unroll 16
    for (int64_t k = 0; k < kK; ++k) {
      const Vt g = in_register(Vt::load(G_q + s * g_stride + (k0 + k) * kBlock));
#pragma GCC unroll 16
      for (int64_t e = 0; e < kE; ++e) {
        acc[k][e] = fma(x[e], g, acc[k][e]);
      }
    }
  }
#pragma GCC unroll 16
  for (int64_t k = 0; k < kK; ++k) {
#pragma GCC unroll 16
    for (int64_t e = 0; e < kE; ++e) {
      acc[k][e].store(grad_W_q + ((k0 + k) * dim_in + e0 + e) * kBlock);
    }
  }
}

// grad_u of the tile's samples += one chunk of rows, vector q (all tiles of the register file).
template <typename T>
C10_ALWAYS_INLINE void grad_u_of_chunk(
    int64_t count, int64_t rows, const T* W_q, const T* G_q, int64_t g_stride, T* grad_u_q, int64_t dim_in) {
  int64_t s = 0;
  for (; s + kGradUSamples <= count; s += kGradUSamples) {
    int64_t e = 0;
    for (; e + kGradUColumns <= dim_in; e += kGradUColumns) {
      grad_u_tile<T, kGradUSamples, kGradUColumns>(s, e, rows, W_q, G_q, g_stride, grad_u_q, dim_in);
    }
    for (; e < dim_in; ++e) {
      grad_u_tile<T, kGradUSamples, 1>(s, e, rows, W_q, G_q, g_stride, grad_u_q, dim_in);
    }
  }
  for (; s < count; ++s) {
    int64_t e = 0;
    for (; e + kGradUColumns <= dim_in; e += kGradUColumns) {
      grad_u_tile<T, 1, kGradUColumns>(s, e, rows, W_q, G_q, g_stride, grad_u_q, dim_in);
    }
    for (; e < dim_in; ++e) {
      grad_u_tile<T, 1, 1>(s, e, rows, W_q, G_q, g_stride, grad_u_q, dim_in);
    }
  }
}

// grad W of one chunk of rows, vector q, += the tile's outer products.
template <typename T>
C10_ALWAYS_INLINE void grad_W_of_chunk(
    int64_t count, int64_t rows, const T* u_q, int64_t u_stride, const T* G_q, int64_t g_stride, T* grad_W_q,
    int64_t dim_in) {
  int64_t k = 0;
  for (; k + kGradWRows <= rows; k += kGradWRows) {
    int64_t e = 0;
    for (; e + kGradWColumns <= dim_in; e += kGradWColumns) {
      grad_W_tile<T, kGradWRows, kGradWColumns>(k, e, count, u_q, u_stride, G_q, g_stride, grad_W_q, dim_in);
    }
    for (; e < dim_in; ++e) {
      grad_W_tile<T, kGradWRows, 1>(k, e, count, u_q, u_stride, G_q, g_stride, grad_W_q, dim_in);
    }
  }
  for (; k < rows; ++k) {
    for (int64_t e = 0; e < dim_in; ++e) {
      grad_W_tile<T, 1, 1>(k, e, count, u_q, u_stride, G_q, g_stride, grad_W_q, dim_in);
    }
  }
}

// grad u and grad W of a tile of `count` samples of one block, from their grad u_hat:
// for rows in chunks of kRowChunk, produce(k0, k1) writes G [count, k1 - k0, L] rows
// (samples g_stride apart, relative to row k0) at G, then both products take them.
// grad_u [count, D_in, L] is overwritten, grad_W [N_out*D_out, D_in, L] added to.
template <typename T, typename Produce>
C10_ALWAYS_INLINE void gradient_products(
    int64_t count, const T* W, const T* u, int64_t u_stride, T* G, int64_t g_stride, T* grad_u, T* grad_W,
    const RoutingShape& shape, int64_t dim_in, const Produce& produce) {
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t out_size = shape.out_size();
  fill(grad_u, count * dim_in * kBlock, T(0));
  for (int64_t k0 = 0; k0 < out_size; k0 += kRowChunk) {
    const int64_t rows = min_of(kRowChunk, out_size - k0);
    const T* G_rows = produce(k0, k0 + rows);
    for (int64_t q = 0; q < kBlockVectors<T>; ++q) {
      const int64_t offset = q * kLanes<T>;
      grad_u_of_chunk(count, rows, W + k0 * dim_in * kBlock + offset, G_rows + offset, g_stride, grad_u + offset, dim_in);
      grad_W_of_chunk(count, rows, u + offset, u_stride, G_rows + offset, g_stride,
                      grad_W + k0 * dim_in * kBlock + offset, dim_in);
    }
  }
}

// One block of input capsules, [i_begin, i_begin + width), as both backward passes over
// blocks (backward_block.h, backward_detached.h) see it.
template <typename T, int kDimIn>
struct InputBlock {
  int64_t dim_in, out_size, num_out, blocks, i_begin, width;
  const T* W;  // the block's W [N_out*D_out, D_in, L]

  InputBlock(const BackwardProblem<T>& p, int64_t block)
      : dim_in(dim_in_of<kDimIn>(p.shape)),
        out_size(p.shape.out_size()),
        num_out(p.shape.num_out),
        blocks(num_capsule_blocks(p.shape.num_in, capsule_block<T>())),
        i_begin(block * capsule_block<T>()),
        width(min_of(capsule_block<T>(), p.shape.num_in - i_begin)),
        W(p.W_blocked + block * out_size * dim_in * capsule_block<T>()) {}
};

// grad_u [count, D_in, L] of the samples [first, first + count) of one block (input capsules
// [i_begin, i_begin + width)) into the natural layout [B, N_in, D_in].
template <typename T>
C10_ALWAYS_INLINE void store_grad_u(
    const T* grad_u_block, int64_t first, int64_t count, int64_t i_begin, int64_t width, T* grad_u,
    const RoutingShape& shape, int64_t dim_in) {
  constexpr int64_t kBlock = capsule_block<T>();
  for (int64_t s = 0; s < count; ++s) {
    T* out = grad_u + ((first + s) * shape.num_in + i_begin) * dim_in;
    transpose_matrix<T, false>(grad_u_block + s * dim_in * kBlock, kBlock, dim_in, width, out, dim_in);
  }
}

// A block's grad W [N_out*D_out, D_in, L] into the natural layout [N_in, N_out*D_out, D_in]:
// written by the first chunk of samples, added to by the others.
template <typename T>
C10_ALWAYS_INLINE void store_grad_W(
    const T* grad_W_block, int64_t i_begin, int64_t width, bool first_chunk, T* grad_W, const RoutingShape& shape,
    int64_t dim_in) {
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t out_size = shape.out_size();
  T* out = grad_W + i_begin * out_size * dim_in;
  const int64_t row = out_size * dim_in;
  if (first_chunk) {
    transpose_matrix<T, false>(grad_W_block, kBlock, row, width, out, row);
  } else {
    transpose_matrix<T, true>(grad_W_block, kBlock, row, width, out, row);
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
