// Backward phase 2, per block of input capsules, over the samples of a chunk in order,
// kGradSamples at a time: rebuild grad u_hat from phase 1's terms, then
//   grad_u[b, i, e] = sum_k W[i, k, e] grad_u_hat[b][k, i]                 (k in order)
//   grad_W[i, k, e] = sum_b u[b, i, e] grad_u_hat[b][k, i]                 (b in order)
//   grad_prior[i, j] = sum_b Gb_0[b][i, j]                                 (b in order)
// Both products are small matrix products per input capsule, vectorised over the block's
// capsules, with register tiles sized for the variant's register file.
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/predictions.h"
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

// grad_u[s][e, q] += sum_{k in chunk} W[k, e, q] G[s][k, q] for samples [s0, s0 + kS),
// components [e0, e0 + kE), vector q (pointers W_q, G_q, grad_u_q at its offset);
// G [samples, kRowChunk, L], grad_u [samples, D_in, L].
template <typename T, int64_t kS, int64_t kE>
C10_ALWAYS_INLINE void grad_u_tile(
    int64_t s0, int64_t e0, int64_t rows, const T* W_q, const T* G_q, T* grad_u_q, int64_t dim_in) {
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
      g[s] = in_register(Vt::load(G_q + ((s0 + s) * kRowChunk + k) * kBlock));
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
// [k0, k0 + kK) of the chunk, components [e0, e0 + kE), vector q (pointers at its offset);
// u [samples][D_in, L] (u_stride apart).
template <typename T, int64_t kK, int64_t kE>
C10_ALWAYS_INLINE void grad_W_tile(
    int64_t k0, int64_t e0, int64_t count, const T* u_q, int64_t u_stride, const T* G_q, T* grad_W_q,
    int64_t dim_in) {
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
      const Vt g = in_register(Vt::load(G_q + (s * kRowChunk + k0 + k) * kBlock));
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
    int64_t count, int64_t rows, const T* W_q, const T* G_q, T* grad_u_q, int64_t dim_in) {
  int64_t s = 0;
  for (; s + kGradUSamples <= count; s += kGradUSamples) {
    int64_t e = 0;
    for (; e + kGradUColumns <= dim_in; e += kGradUColumns) {
      grad_u_tile<T, kGradUSamples, kGradUColumns>(s, e, rows, W_q, G_q, grad_u_q, dim_in);
    }
    for (; e < dim_in; ++e) {
      grad_u_tile<T, kGradUSamples, 1>(s, e, rows, W_q, G_q, grad_u_q, dim_in);
    }
  }
  for (; s < count; ++s) {
    for (int64_t e = 0; e < dim_in; ++e) {
      grad_u_tile<T, 1, 1>(s, e, rows, W_q, G_q, grad_u_q, dim_in);
    }
  }
}

// grad W of one chunk of rows, vector q, += the tile's outer products.
template <typename T>
C10_ALWAYS_INLINE void grad_W_of_chunk(
    int64_t count, int64_t rows, const T* u_q, int64_t u_stride, const T* G_q, T* grad_W_q, int64_t dim_in) {
  int64_t k = 0;
  for (; k + kGradWRows <= rows; k += kGradWRows) {
    int64_t e = 0;
    for (; e + kGradWColumns <= dim_in; e += kGradWColumns) {
      grad_W_tile<T, kGradWRows, kGradWColumns>(k, e, count, u_q, u_stride, G_q, grad_W_q, dim_in);
    }
    for (; e < dim_in; ++e) {
      grad_W_tile<T, kGradWRows, 1>(k, e, count, u_q, u_stride, G_q, grad_W_q, dim_in);
    }
  }
  for (; k < rows; ++k) {
    for (int64_t e = 0; e < dim_in; ++e) {
      grad_W_tile<T, 1, 1>(k, e, count, u_q, u_stride, G_q, grad_W_q, dim_in);
    }
  }
}

template <typename T, int kDimIn>
void backward_block(
    const BackwardProblem<T>& p, int64_t block, int64_t begin, int64_t end, bool first_chunk, T* workspace) {
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
  const int64_t u_stride = blocks * dim_in * kBlock;  // from one sample's block to the next's
  const T* W = p.W_blocked + block * out_size * dim_in * kBlock;
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
    fill(ws.grad_u, count * dim_in * kBlock, T(0));
    for (int64_t k0 = 0; k0 < out_size; k0 += kRowChunk) {
      const int64_t rows = min_of(kRowChunk, out_size - k0);
      rebuild_grad_u_hat_any(count, k0, k0 + rows, sample_planes, sample_vectors, p.terms.terms, ws.grad_u_hat, shape);
      for (int64_t q = 0; q < kBlockVectors<T>; ++q) {
        const int64_t offset = q * kLanes<T>;
        grad_u_of_chunk(count, rows, W + k0 * dim_in * kBlock + offset, ws.grad_u_hat + offset, ws.grad_u + offset,
                        dim_in);
        grad_W_of_chunk(count, rows, u + offset, u_stride, ws.grad_u_hat + offset,
                        ws.grad_W + k0 * dim_in * kBlock + offset, dim_in);
      }
    }
    for (int64_t s = 0; s < count; ++s) {
      T* grad_u = p.grad_u + ((tile + s) * shape.num_in + i_begin) * dim_in;
      for (int64_t lane = 0; lane < width; ++lane) {
        for (int64_t e = 0; e < dim_in; ++e) {
          grad_u[lane * dim_in + e] = ws.grad_u[(s * dim_in + e) * kBlock + lane];
        }
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
