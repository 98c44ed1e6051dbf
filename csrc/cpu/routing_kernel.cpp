// Fused dynamic routing on the CPU: forward and backward, registered for the CPU key.
//
// Layout. Every per-capsule-pair quantity is stored with the input capsule i innermost,
// so that every inner loop is a contiguous, vectorised loop over i and no loop ever has
// to add up the lanes of a short vector (D_out = 16) one by one:
//   W_blocked [N_in/16, N_out*D_out, D_in, 16]   W rearranged once per call: blocks of 16
//                                         input capsules, each block contiguous
//   u_hat   [N_out*D_out, N_in]          per-sample scratch (737 KB for CapsNet, in L2)
//   logits  [N_out, N_in]                per-sample scratch
//   couplings [B, r, N_out, N_in]        saved by forward for backward
//
// Forward, a tile of kSampleTile samples at a time (tiles in parallel over ATen's pool):
// u_hat = W u (Eq. 2) for the tile in one sweep over W (5.9 MB, read once per tile), then
// per sample and iteration: agreement with the previous v added to the logits, softmax
// over j for every i (Eq. 3), s_j = sum_i c_ij u_hat_j|i (Eq. 2), v = squash(s) (Eq. 1).
// Nothing batch-sized is allocated besides the outputs: v, s_saved [B, r, N_out, D_out]
// and couplings.
//
// Backward, in two deterministic phases (no atomics, no reduction whose order depends on
// the number of threads):
//   phase 1, per sample: recompute u_hat and sweep the iterations in reverse. The gradient
//     of u_hat is a short linear combination of per-sample vectors (see
//     routing_backward_sample); phase 1 stores its coefficients that forward did not
//     already save (the logit gradients, [B, r-1, N_out, N_in]) and the vectors.
//   phase 2, per block of input capsules, batch in a fixed order: rebuild grad u_hat from
//     the coefficients and accumulate grad W and grad u.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/vectorized_exp.h"
#include "routing_checks.h"
#include "routing_math.h"

namespace capsnet {
namespace {

// Samples whose predictions are computed in one sweep over W: two u_hat buffers of 737 KB
// still fit a 2 MB L2 beside the streamed rows of W.
constexpr int64_t kSampleTile = 2;
// Input capsules per block of W_blocked and per task of backward phase 2 (one AVX-512
// register of floats).
constexpr int64_t kCapsuleBlock = 16;
// Samples combined per update of a grad W block in phase 2, so that the block is loaded
// and stored once per tile instead of once per sample.
constexpr int64_t kGradTile = 4;

// Sum of a[k] * b[k] over a long contiguous range. `omp simd reduction` lets the compiler
// keep partial sums in vector lanes; the order is fixed by the compiled code, so the
// result is the same on every call and from every thread.
template <typename scalar_t>
C10_ALWAYS_INLINE scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) {
    acc += a[k] * b[k];
  }
  return acc;
}

// y += alpha * x
template <typename scalar_t>
C10_ALWAYS_INLINE void axpy(scalar_t alpha, const scalar_t* x, scalar_t* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    y[k] += alpha * x[k];
  }
}

// D_in as a compile-time constant for CapsNet (8) so that the prediction loop keeps its
// sum over e in registers; 0 = known at run time.
template <int kDim>
constexpr int64_t capsule_dim(int64_t runtime_dim) {
  return kDim > 0 ? kDim : runtime_dim;
}

template <typename Fn>
void dispatch_dim_in(const RoutingShape& shape, Fn&& fn) {
  if (shape.dim_in == 8) {
    fn(std::integral_constant<int, 8>{});
  } else {
    fn(std::integral_constant<int, 0>{});
  }
}

// Squared norm of a short vector, summed in order (deterministic and cheap at D_out <= 32).
template <typename scalar_t>
inline scalar_t squared_norm(const scalar_t* x, int64_t n) {
  scalar_t acc = 0;
  for (int64_t k = 0; k < n; ++k) {
    acc += x[k] * x[k];
  }
  return acc;
}

// v_j = squash(s_j) for every output capsule j (Eq. 1).
template <typename scalar_t>
void squash_capsules(const scalar_t* s, scalar_t* v, const RoutingShape& shape) {
  const int64_t dim = shape.dim_out;
  for (int64_t j = 0; j < shape.num_out; ++j) {
    const scalar_t* s_j = s + j * dim;
    const scalar_t scale = squash_scale(squared_norm(s_j, dim));
    for (int64_t d = 0; d < dim; ++d) {
      v[j * dim + d] = scale * s_j[d];
    }
  }
}

// grad_s_j from (s_j, grad_v_j) for every output capsule j; see routing_math.h.
template <typename scalar_t>
void squash_backward_capsules(
    const scalar_t* s, const scalar_t* grad_v, scalar_t* grad_s, const RoutingShape& shape) {
  const int64_t dim = shape.dim_out;
  for (int64_t j = 0; j < shape.num_out; ++j) {
    const scalar_t* s_j = s + j * dim;
    const scalar_t* gv_j = grad_v + j * dim;
    const scalar_t sq_norm = squared_norm(s_j, dim);
    scalar_t s_dot_gv = 0;
    for (int64_t d = 0; d < dim; ++d) {
      s_dot_gv += s_j[d] * gv_j[d];
    }
    const scalar_t scale = squash_scale(sq_norm);
    const scalar_t outer = squash_grad_outer_coeff(sq_norm) * s_dot_gv;
    for (int64_t d = 0; d < dim; ++d) {
      grad_s[j * dim + d] = scale * gv_j[d] + outer * s_j[d];
    }
  }
}

// u_hat[n][k, i] = sum_e W[i, k, e] u[n][i, e], k = j*D_out + d   (Eq. 2), for the `count`
// samples of a tile, from W_blocked and u_t[n] = u[n] transposed [D_in, N_in]. One block of
// kCapsuleBlock input capsules at a time: the block's u values stay in registers while
// its slice of W (80 KB for CapsNet, contiguous) streams past once for the whole tile.
template <typename scalar_t, int kDimIn>
void compute_predictions(
    const scalar_t* const* u_t, scalar_t* const* u_hat, int64_t count, const scalar_t* W_blocked,
    const RoutingShape& shape) {
  constexpr int64_t kLanes = kCapsuleBlock;
  const int64_t dim_in = capsule_dim<kDimIn>(shape.dim_in);
  const int64_t num_in = shape.num_in;
  const int64_t out_size = shape.out_size();
  // Zero for the samples missing from a partial tile, so that the loops below can always
  // run over kSampleTile samples.
  std::vector<scalar_t> u_block(kSampleTile * dim_in * kLanes, scalar_t(0));
  for (int64_t i_begin = 0; i_begin < num_in; i_begin += kLanes) {
    const int64_t width = std::min(kLanes, num_in - i_begin);
    // The block's inputs, zero-padded to full width.
    for (int64_t n = 0; n < count; ++n) {
      for (int64_t e = 0; e < dim_in; ++e) {
        scalar_t* dst = u_block.data() + (n * dim_in + e) * kLanes;
        std::fill(dst, dst + kLanes, scalar_t(0));
        std::copy_n(u_t[n] + e * num_in + i_begin, width, dst);
      }
    }
    const scalar_t* W_block = W_blocked + (i_begin / kLanes) * out_size * dim_in * kLanes;
    for (int64_t k = 0; k < out_size; ++k) {
      const scalar_t* W_k = W_block + k * dim_in * kLanes;
      // Each row of W is loaded once and used for every sample of the tile.
      scalar_t acc[kSampleTile][kLanes] = {};
      for (int64_t e = 0; e < dim_in; ++e) {
        for (int64_t n = 0; n < kSampleTile; ++n) {
          const scalar_t* u_ne = u_block.data() + (n * dim_in + e) * kLanes;
#pragma omp simd
          for (int64_t lane = 0; lane < kLanes; ++lane) {
            acc[n][lane] += W_k[e * kLanes + lane] * u_ne[lane];
          }
        }
      }
      for (int64_t n = 0; n < count; ++n) {
        scalar_t* out = u_hat[n] + k * num_in + i_begin;
        if (width == kLanes) {
#pragma omp simd
          for (int64_t lane = 0; lane < kLanes; ++lane) {
            out[lane] = acc[n][lane];
          }
        } else {
          std::copy_n(acc[n], width, out);
        }
      }
    }
  }
}

// couplings[j, i] = softmax over j of logits[:, i]   (Eq. 3: over the OUTPUT capsules),
// max-subtracted so that exp() cannot overflow. Vectorised over i.
template <typename scalar_t>
void softmax_over_outputs(
    const scalar_t* logits, scalar_t* couplings, scalar_t* column_scratch, const RoutingShape& shape) {
  const int64_t num_in = shape.num_in;
  scalar_t* column_max = column_scratch;
  std::copy(logits, logits + num_in, column_max);
  for (int64_t j = 1; j < shape.num_out; ++j) {
    const scalar_t* logits_j = logits + j * num_in;
#pragma omp simd
    for (int64_t i = 0; i < num_in; ++i) {
      column_max[i] = logits_j[i] > column_max[i] ? logits_j[i] : column_max[i];
    }
  }
  for (int64_t j = 0; j < shape.num_out; ++j) {
    const scalar_t* logits_j = logits + j * num_in;
    scalar_t* c_j = couplings + j * num_in;
#pragma omp simd
    for (int64_t i = 0; i < num_in; ++i) {
      c_j[i] = cpu::vectorizable_exp(logits_j[i] - column_max[i]);
    }
  }
  scalar_t* inv_total = column_scratch;  // the maxima are no longer needed
  std::copy(couplings, couplings + num_in, inv_total);
  for (int64_t j = 1; j < shape.num_out; ++j) {
    axpy(scalar_t(1), couplings + j * num_in, inv_total, num_in);
  }
#pragma omp simd
  for (int64_t i = 0; i < num_in; ++i) {
    inv_total[i] = scalar_t(1) / inv_total[i];
  }
  for (int64_t j = 0; j < shape.num_out; ++j) {
    scalar_t* c_j = couplings + j * num_in;
#pragma omp simd
    for (int64_t i = 0; i < num_in; ++i) {
      c_j[i] *= inv_total[i];
    }
  }
}

// out[j, i] (+)= sum_d u_hat[j*D_out + d, i] * x[j, d]: the agreement u_hat_j|i . v_j
// (accumulate = true) or the gradient of the couplings u_hat_j|i . grad_s_j.
template <typename scalar_t>
void project_predictions(
    const scalar_t* u_hat, const scalar_t* x, scalar_t* out, bool accumulate, const RoutingShape& shape) {
  const int64_t num_in = shape.num_in;
  const int64_t dim = shape.dim_out;
  for (int64_t j = 0; j < shape.num_out; ++j) {
    scalar_t* out_j = out + j * num_in;
    if (!accumulate) {
      std::fill(out_j, out_j + num_in, scalar_t(0));
    }
    for (int64_t d = 0; d < dim; ++d) {
      axpy(x[j * dim + d], u_hat + (j * dim + d) * num_in, out_j, num_in);
    }
  }
}

// out[j*D_out + d] = sum_i weights[j, i] * u_hat[j*D_out + d, i]: the weighted sum s_j
// (weights = couplings, Eq. 2) or the gradient of v through the agreement.
template <typename scalar_t>
void weighted_sum_of_predictions(
    const scalar_t* u_hat, const scalar_t* weights, scalar_t* out, const RoutingShape& shape) {
  const int64_t num_in = shape.num_in;
  const int64_t dim = shape.dim_out;
  for (int64_t j = 0; j < shape.num_out; ++j) {
    for (int64_t d = 0; d < dim; ++d) {
      out[j * dim + d] = dot(weights + j * num_in, u_hat + (j * dim + d) * num_in, num_in);
    }
  }
}

// Per-thread working memory for one tile of samples.
template <typename scalar_t>
struct TileScratch {
  std::vector<scalar_t> u_t;     // [kSampleTile, D_in, N_in]
  std::vector<scalar_t> u_hat;   // [kSampleTile, N_out*D_out, N_in]
  std::vector<scalar_t> logits;  // [N_out, N_in]; backward: their gradient
  std::vector<scalar_t> grad_c;  // [N_out, N_in]  (backward)
  std::vector<scalar_t> column;  // [N_in]
  std::vector<scalar_t> v;       // [N_out*D_out]
  std::vector<scalar_t> grad_v;  // [N_out*D_out]

  explicit TileScratch(const RoutingShape& shape)
      : u_t(kSampleTile * shape.dim_in * shape.num_in),
        u_hat(kSampleTile * shape.out_size() * shape.num_in),
        logits(shape.num_out * shape.num_in),
        grad_c(shape.num_out * shape.num_in),
        column(shape.num_in),
        v(shape.out_size()),
        grad_v(shape.out_size()) {}

  scalar_t* u_hat_of(int64_t n, const RoutingShape& shape) {
    return u_hat.data() + n * shape.out_size() * shape.num_in;
  }
};

// Predictions of samples [begin, end) (at most kSampleTile) into scratch.u_hat.
template <typename scalar_t, int kDimIn>
void predict_tile(
    const scalar_t* u, const scalar_t* W_blocked, int64_t begin, int64_t end,
    TileScratch<scalar_t>& scratch, const RoutingShape& shape) {
  const int64_t num_in = shape.num_in;
  const int64_t dim_in = shape.dim_in;
  const scalar_t* u_t[kSampleTile];
  scalar_t* u_hat[kSampleTile];
  for (int64_t n = 0; n < end - begin; ++n) {
    const scalar_t* u_b = u + (begin + n) * num_in * dim_in;
    scalar_t* u_t_n = scratch.u_t.data() + n * dim_in * num_in;
    for (int64_t i = 0; i < num_in; ++i) {
      for (int64_t e = 0; e < dim_in; ++e) {
        u_t_n[e * num_in + i] = u_b[i * dim_in + e];
      }
    }
    u_t[n] = u_t_n;
    u_hat[n] = scratch.u_hat_of(n, shape);
  }
  compute_predictions<scalar_t, kDimIn>(u_t, u_hat, end - begin, W_blocked, shape);
}

template <typename scalar_t>
void routing_forward_sample(
    const scalar_t* u_hat, const scalar_t* bias, scalar_t* s_saved, scalar_t* couplings,
    scalar_t* v_out, TileScratch<scalar_t>& scratch, const RoutingShape& shape) {
  const int64_t out_size = shape.out_size();
  const int64_t pair_count = shape.num_out * shape.num_in;
  std::fill(scratch.logits.begin(), scratch.logits.end(), scalar_t(0));  // logits start at 0
  for (int64_t t = 0; t < shape.iterations; ++t) {
    scalar_t* c = couplings + t * pair_count;
    if (t == 0) {
      // softmax of all-zero logits: exactly 1/N_out (exp(0) = 1, an exact integer sum).
      std::fill(c, c + pair_count, scalar_t(1) / static_cast<scalar_t>(shape.num_out));
    } else {
      project_predictions(u_hat, scratch.v.data(), scratch.logits.data(), /*accumulate=*/true, shape);
      softmax_over_outputs(scratch.logits.data(), c, scratch.column.data(), shape);
    }
    scalar_t* s = s_saved + t * out_size;
    weighted_sum_of_predictions(u_hat, c, s, shape);
    if (bias != nullptr) {
      axpy(scalar_t(1), bias, s, out_size);
    }
    squash_capsules(s, scratch.v.data(), shape);
  }
  std::copy(scratch.v.begin(), scratch.v.end(), v_out);
}

// Phase 1 of backward for one sample. With 0-based iterations t = 0..r-1, the gradient of
// u_hat_j|i is
//   sum_t c^t[j, i] grad_s^t[j]  +  sum_{t<r-1} grad_b^{t+1}[j, i] v^t[j],
// where grad_b^{t+1} is the gradient of the logits entering iteration t+1 (they add the
// agreement u_hat . v^t). Each term is a per-(i, j) scalar times a per-j vector, so phase 2
// rebuilds it from
//   couplings   [r, N_out, N_in]     c^0..c^{r-1}                        (saved by forward)
//   grad_logits [r-1, N_out, N_in]   grad_b^1..grad_b^{r-1}               (written here)
//   vectors     [2r-1, N_out*D_out]  grad_s^0..grad_s^{r-1}, v^0..v^{r-2} (written here)
template <typename scalar_t>
void routing_backward_sample(
    const scalar_t* u_hat, const scalar_t* grad_v, const scalar_t* s_saved,
    const scalar_t* couplings, scalar_t* grad_logits_out, scalar_t* vectors,
    TileScratch<scalar_t>& scratch, const RoutingShape& shape) {
  const int64_t r = shape.iterations;
  const int64_t num_in = shape.num_in;
  const int64_t out_size = shape.out_size();
  const int64_t pair_count = shape.num_out * num_in;
  for (int64_t t = 0; t + 1 < r; ++t) {
    // v^t = squash(s^t): bitwise what the forward computed from the same s^t.
    squash_capsules(s_saved + t * out_size, vectors + (r + t) * out_size, shape);
  }
  // Reverse sweep. grad_logits accumulates dL/db^t over the iterations already swept:
  // b^{t+1} = b^t + agreement, so dL/db^t = dL/db^{t+1} + (softmax backward of iteration t).
  scalar_t* grad_logits = scratch.logits.data();
  scalar_t* grad_c = scratch.grad_c.data();
  scalar_t* c_dot_grad_c = scratch.column.data();
  std::fill(scratch.logits.begin(), scratch.logits.end(), scalar_t(0));
  std::copy(grad_v, grad_v + out_size, scratch.grad_v.data());
  for (int64_t t = r - 1; t >= 0; --t) {
    scalar_t* grad_s = vectors + t * out_size;
    squash_backward_capsules(s_saved + t * out_size, scratch.grad_v.data(), grad_s, shape);
    if (t == 0) {
      break;  // the logits of iteration 0 are the constant 0: nothing more flows back
    }
    // Softmax backward of iteration t: grad_b = c * (grad_c - sum_j c grad_c), per i.
    const scalar_t* c = couplings + t * pair_count;
    project_predictions(u_hat, grad_s, grad_c, /*accumulate=*/false, shape);
    std::fill(c_dot_grad_c, c_dot_grad_c + num_in, scalar_t(0));
    for (int64_t j = 0; j < shape.num_out; ++j) {
      const scalar_t* c_j = c + j * num_in;
      const scalar_t* grad_c_j = grad_c + j * num_in;
#pragma omp simd
      for (int64_t i = 0; i < num_in; ++i) {
        c_dot_grad_c[i] += c_j[i] * grad_c_j[i];
      }
    }
    for (int64_t j = 0; j < shape.num_out; ++j) {
      const scalar_t* c_j = c + j * num_in;
      const scalar_t* grad_c_j = grad_c + j * num_in;
      scalar_t* grad_logits_j = grad_logits + j * num_in;
#pragma omp simd
      for (int64_t i = 0; i < num_in; ++i) {
        grad_logits_j[i] += c_j[i] * (grad_c_j[i] - c_dot_grad_c[i]);
      }
    }
    // Saved as the coefficient of v^{t-1}, then the gradient of v^{t-1} through the
    // agreement that produced b^t.
    std::copy(grad_logits, grad_logits + pair_count, grad_logits_out + (t - 1) * pair_count);
    weighted_sum_of_predictions(u_hat, grad_logits, scratch.grad_v.data(), shape);
  }
}

// Phase 2 for the input capsules [i_begin, i_end) (at most kCapsuleBlock), samples in
// order, in tiles of kGradTile:
//   g[k, i] = grad u_hat_j|i for sample b   (k = j*D_out + d), rebuilt from the coefficients
//   grad_u[b, i, e]     = sum_k W[i, k, e] g[k, i]
//   grad_W[i, k, e]    += u[b, i, e] g[k, i]     (summed over b in order: deterministic)
// grad_W is written in the W_blocked layout; lanes past N_in stay 0.
// kWidth: the block width as a compile-time constant for full blocks (the loops over the
// block then become single vector instructions), 0 for the last, partial block.
template <typename scalar_t, int kDimIn, int kWidth>
void routing_backward_capsule_block(
    int64_t i_begin, int64_t i_end, const scalar_t* u_t_all, const scalar_t* W_blocked,
    const scalar_t* couplings, const scalar_t* grad_logits, const scalar_t* vectors,
    scalar_t* grad_u, scalar_t* grad_W_blocked, scalar_t* g_tile, const RoutingShape& shape) {
  const int64_t r = shape.iterations;
  const int64_t num_in = shape.num_in;
  const int64_t dim = shape.dim_out;
  const int64_t dim_in = capsule_dim<kDimIn>(shape.dim_in);
  const int64_t out_size = shape.out_size();
  const int64_t pair_count = shape.num_out * num_in;
  const int64_t width = kWidth > 0 ? kWidth : i_end - i_begin;
  const int64_t num_vectors = 2 * r - 1;
  const scalar_t* W_block = W_blocked + (i_begin / kCapsuleBlock) * out_size * dim_in * kCapsuleBlock;
  scalar_t* grad_W_block =
      grad_W_blocked + (i_begin / kCapsuleBlock) * out_size * dim_in * kCapsuleBlock;
  std::fill_n(grad_W_block, out_size * dim_in * kCapsuleBlock, scalar_t(0));
  // The loops below keep their sums in local arrays of kLanes (vector registers) and run
  // over all kLanes lanes wherever the data is padded: W_blocked is zero past N_in, and so
  // is g (its sums start at 0 and only `width` lanes are added to).
  constexpr int64_t kLanes = kCapsuleBlock;
  for (int64_t tile_start = 0; tile_start < shape.batch; tile_start += kGradTile) {
    const int64_t tile = std::min(kGradTile, shape.batch - tile_start);
    for (int64_t n = 0; n < tile; ++n) {
      const int64_t b = tile_start + n;
      const scalar_t* c_b = couplings + b * r * pair_count + i_begin;
      const scalar_t* gl_b = grad_logits + b * (r - 1) * pair_count + i_begin;
      const scalar_t* vectors_b = vectors + b * num_vectors * out_size;
      scalar_t* g = g_tile + n * out_size * kLanes;
      // The 2r-1 coefficient rows of every j are far apart in memory (one block-wide slice
      // of each [N_out, N_in] plane): too many streams for the hardware prefetcher, so ask
      // for the next sample's rows while this one is computed.
      if (b + 1 < shape.batch) {
        const scalar_t* c_next = c_b + r * pair_count;
        const scalar_t* gl_next = gl_b + (r - 1) * pair_count;
        for (int64_t j = 0; j < shape.num_out; ++j) {
          for (int64_t term = 0; term < num_vectors; ++term) {
            __builtin_prefetch(
                (term < r ? c_next + term * pair_count : gl_next + (term - r) * pair_count) + j * num_in);
          }
        }
      }
      // g[k] = sum over the 2r-1 terms of coefficient row (j) * vector element (k), four
      // components d at a time: four independent sums per coefficient row loaded.
      constexpr int64_t kComponents = 4;
      for (int64_t j = 0; j < shape.num_out; ++j) {
        for (int64_t d0 = 0; d0 < dim; d0 += kComponents) {
          const int64_t components = std::min(kComponents, dim - d0);
          scalar_t acc[kComponents][kLanes] = {};
          for (int64_t term = 0; term < num_vectors; ++term) {
            const scalar_t* coeff =
                (term < r ? c_b + term * pair_count : gl_b + (term - r) * pair_count) + j * num_in;
            const scalar_t* x = vectors_b + term * out_size + j * dim + d0;
            for (int64_t q = 0; q < kComponents; ++q) {
              const scalar_t x_q = q < components ? x[q] : scalar_t(0);
#pragma omp simd
              for (int64_t ii = 0; ii < width; ++ii) {
                acc[q][ii] += x_q * coeff[ii];
              }
            }
          }
          for (int64_t q = 0; q < components; ++q) {
            std::copy_n(acc[q], kLanes, g + (j * dim + d0 + q) * kLanes);
          }
        }
      }
      // grad_u[b, i, e] = sum_k W[i, k, e] g[k, i]
      if constexpr (kDimIn > 0) {
        scalar_t acc[kDimIn][kLanes] = {};
        for (int64_t k = 0; k < out_size; ++k) {
          const scalar_t* g_k = g + k * kLanes;
          const scalar_t* W_k = W_block + k * kDimIn * kLanes;
          for (int64_t e = 0; e < kDimIn; ++e) {
#pragma omp simd
            for (int64_t ii = 0; ii < kLanes; ++ii) {
              acc[e][ii] += W_k[e * kLanes + ii] * g_k[ii];
            }
          }
        }
        for (int64_t ii = 0; ii < width; ++ii) {
          for (int64_t e = 0; e < kDimIn; ++e) {
            grad_u[(b * num_in + i_begin + ii) * kDimIn + e] = acc[e][ii];
          }
        }
      } else {
        for (int64_t e = 0; e < dim_in; ++e) {
          scalar_t acc[kLanes] = {};
          for (int64_t k = 0; k < out_size; ++k) {
            const scalar_t* W_ke = W_block + (k * dim_in + e) * kLanes;
            const scalar_t* g_k = g + k * kLanes;
#pragma omp simd
            for (int64_t ii = 0; ii < kLanes; ++ii) {
              acc[ii] += W_ke[ii] * g_k[ii];
            }
          }
          for (int64_t ii = 0; ii < width; ++ii) {
            grad_u[(b * num_in + i_begin + ii) * dim_in + e] = acc[ii];
          }
        }
      }
    }
    // grad_W[i, k, e] += u[b, i, e] g_b[k, i] for the tile's samples, in order.
    for (int64_t e = 0; e < dim_in; ++e) {
      scalar_t u_e[kGradTile][kLanes] = {};
      for (int64_t n = 0; n < tile; ++n) {
        std::copy_n(u_t_all + ((tile_start + n) * dim_in + e) * num_in + i_begin, width, u_e[n]);
      }
      for (int64_t k = 0; k < out_size; ++k) {
        scalar_t* grad_W_ke = grad_W_block + (k * dim_in + e) * kLanes;
        scalar_t acc[kLanes];
        std::copy_n(grad_W_ke, kLanes, acc);
        for (int64_t n = 0; n < tile; ++n) {
          const scalar_t* g_k = g_tile + (n * out_size + k) * kLanes;
#pragma omp simd
          for (int64_t ii = 0; ii < kLanes; ++ii) {
            acc[ii] += u_e[n][ii] * g_k[ii];
          }
        }
        std::copy_n(acc, kLanes, grad_W_ke);
      }
    }
  }
}

int64_t num_capsule_blocks(int64_t num_in) {
  return (num_in + kCapsuleBlock - 1) / kCapsuleBlock;
}

// [N_in, N_out, D_out, D_in] -> [N_in/16, N_out*D_out, D_in, 16], N_in zero-padded.
at::Tensor block_weights(const at::Tensor& W) {
  const int64_t num_in = W.size(0);
  const int64_t blocks = num_capsule_blocks(num_in);
  at::Tensor padded = W;
  if (blocks * kCapsuleBlock != num_in) {
    padded = at::zeros({blocks * kCapsuleBlock, W.size(1), W.size(2), W.size(3)}, W.options());
    padded.narrow(0, 0, num_in).copy_(W);
  }
  return padded.reshape({blocks, kCapsuleBlock, W.size(1) * W.size(2), W.size(3)})
      .permute({0, 2, 3, 1})
      .contiguous();
}

// The inverse of block_weights: [N_in/16, N_out*D_out, D_in, 16] -> [N_in, N_out, D_out, D_in].
at::Tensor unblock_weights(const at::Tensor& blocked, const RoutingShape& shape) {
  return blocked.permute({0, 3, 1, 2})
      .reshape({blocked.size(0) * kCapsuleBlock, shape.num_out, shape.dim_out, shape.dim_in})
      .narrow(0, 0, shape.num_in)
      .contiguous();
}

// Calls per_sample(b, u_hat of sample b, scratch) for every sample, in parallel over tiles
// of kSampleTile samples whose predictions share one sweep over W. Forward and backward
// phase 1 both walk the batch this way.
template <typename scalar_t, typename PerSample>
void for_each_sample_with_predictions(
    const scalar_t* u, const scalar_t* W_blocked, const RoutingShape& shape, PerSample&& per_sample) {
  const int64_t num_tiles = (shape.batch + kSampleTile - 1) / kSampleTile;
  dispatch_dim_in(shape, [&](auto dim_in) {
    at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      TileScratch<scalar_t> scratch(shape);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t begin = tile * kSampleTile;
        const int64_t end = std::min(begin + kSampleTile, shape.batch);
        predict_tile<scalar_t, dim_in.value>(u, W_blocked, begin, end, scratch, shape);
        for (int64_t b = begin; b < end; ++b) {
          per_sample(b, scratch.u_hat_of(b - begin, shape), scratch);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_forward_cpu(
    const at::Tensor& u_in, const at::Tensor& W_in, const std::optional<at::Tensor>& bias_in,
    int64_t num_iterations) {
  const RoutingShape shape = check_forward_inputs(u_in, W_in, bias_in, num_iterations);
  const at::Tensor u = u_in.contiguous();
  at::Tensor v = at::empty({shape.batch, shape.num_out, shape.dim_out}, u.options());
  at::Tensor s_saved =
      at::empty({shape.batch, shape.iterations, shape.num_out, shape.dim_out}, u.options());
  at::Tensor couplings =
      at::empty({shape.batch, shape.iterations, shape.num_out, shape.num_in}, u.options());
  if (shape.batch == 0) {
    return {v, s_saved, couplings};
  }
  const at::Tensor W_blocked = block_weights(W_in);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_forward_cpu", [&] {
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* W_ptr = W_blocked.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* s_ptr = s_saved.mutable_data_ptr<scalar_t>();
    scalar_t* couplings_ptr = couplings.mutable_data_ptr<scalar_t>();
    scalar_t* v_ptr = v.mutable_data_ptr<scalar_t>();
    const int64_t out_size = shape.out_size();
    const int64_t couplings_per_sample = shape.iterations * shape.num_out * shape.num_in;
    for_each_sample_with_predictions<scalar_t>(
        u_ptr, W_ptr, shape, [&](int64_t b, const scalar_t* u_hat, TileScratch<scalar_t>& scratch) {
          routing_forward_sample(
              u_hat, bias_ptr, s_ptr + b * shape.iterations * out_size,
              couplings_ptr + b * couplings_per_sample, v_ptr + b * out_size, scratch, shape);
        });
  });
  return {v, s_saved, couplings};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_backward_cpu(
    const at::Tensor& grad_v_in, const at::Tensor& u_in, const at::Tensor& W_in,
    const at::Tensor& s_saved_in, const at::Tensor& couplings_in) {
  const RoutingShape shape = check_backward_inputs(grad_v_in, u_in, W_in, s_saved_in, couplings_in);
  const at::Tensor u = u_in.contiguous();
  const at::Tensor grad_v = grad_v_in.contiguous();
  const at::Tensor s_saved = s_saved_in.contiguous();
  const at::Tensor couplings = couplings_in.contiguous();
  at::Tensor grad_u = at::empty_like(u);
  at::Tensor grad_bias = at::zeros({shape.num_out, shape.dim_out}, u.options());
  if (shape.batch == 0) {
    return {grad_u, at::zeros_like(W_in, at::MemoryFormat::Contiguous), grad_bias};
  }
  const int64_t r = shape.iterations;
  const int64_t num_vectors = 2 * r - 1;
  const int64_t out_size = shape.out_size();
  const int64_t pair_count = shape.num_out * shape.num_in;
  const at::Tensor W_blocked = block_weights(W_in);
  const at::Tensor u_t = u.transpose(1, 2).contiguous();  // [B, D_in, N_in] for phase 2
  at::Tensor grad_W_blocked = at::empty_like(W_blocked);
  at::Tensor grad_logits = at::empty({shape.batch, r - 1, shape.num_out, shape.num_in}, u.options());
  at::Tensor vectors = at::empty({shape.batch, num_vectors, out_size}, u.options());

  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_backward_cpu", [&] {
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* u_t_ptr = u_t.const_data_ptr<scalar_t>();
    const scalar_t* W_ptr = W_blocked.const_data_ptr<scalar_t>();
    const scalar_t* grad_v_ptr = grad_v.const_data_ptr<scalar_t>();
    const scalar_t* s_ptr = s_saved.const_data_ptr<scalar_t>();
    const scalar_t* couplings_ptr = couplings.const_data_ptr<scalar_t>();
    scalar_t* grad_logits_ptr = grad_logits.mutable_data_ptr<scalar_t>();
    scalar_t* vectors_ptr = vectors.mutable_data_ptr<scalar_t>();
    scalar_t* grad_u_ptr = grad_u.mutable_data_ptr<scalar_t>();
    scalar_t* grad_W_ptr = grad_W_blocked.mutable_data_ptr<scalar_t>();
    // Phase 1: per sample.
    for_each_sample_with_predictions<scalar_t>(
        u_ptr, W_ptr, shape, [&](int64_t b, const scalar_t* u_hat, TileScratch<scalar_t>& scratch) {
          routing_backward_sample(
              u_hat, grad_v_ptr + b * out_size, s_ptr + b * r * out_size,
              couplings_ptr + b * r * pair_count, grad_logits_ptr + b * (r - 1) * pair_count,
              vectors_ptr + b * num_vectors * out_size, scratch, shape);
        });
    dispatch_dim_in(shape, [&](auto dim_in) {
      // Phase 2: per block of input capsules, batch in a fixed order.
      at::parallel_for(0, num_capsule_blocks(shape.num_in), 1, [&](int64_t block_begin, int64_t block_end) {
        std::vector<scalar_t> g_tile(kGradTile * out_size * kCapsuleBlock);
        for (int64_t block = block_begin; block < block_end; ++block) {
          const int64_t i_begin = block * kCapsuleBlock;
          const int64_t i_end = std::min(i_begin + kCapsuleBlock, shape.num_in);
          if (i_end - i_begin == kCapsuleBlock) {
            routing_backward_capsule_block<scalar_t, dim_in.value, kCapsuleBlock>(
                i_begin, i_end, u_t_ptr, W_ptr, couplings_ptr, grad_logits_ptr, vectors_ptr,
                grad_u_ptr, grad_W_ptr, g_tile.data(), shape);
          } else {
            routing_backward_capsule_block<scalar_t, dim_in.value, 0>(
                i_begin, i_end, u_t_ptr, W_ptr, couplings_ptr, grad_logits_ptr, vectors_ptr,
                grad_u_ptr, grad_W_ptr, g_tile.data(), shape);
          }
        }
      });
    });

    // grad bias = sum over samples and iterations of grad_s, in a fixed order.
    scalar_t* grad_bias_ptr = grad_bias.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < shape.batch; ++b) {
      for (int64_t t = 0; t < r; ++t) {
        axpy(scalar_t(1), vectors_ptr + (b * num_vectors + t) * out_size, grad_bias_ptr, out_size);
      }
    }
  });

  const at::Tensor grad_W = unblock_weights(grad_W_blocked, shape);
  return {grad_u, grad_W, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(capsnet, CPU, m) {
  m.impl("routing_forward", &routing_forward_cpu);
  m.impl("routing_backward", &routing_backward_cpu);
}

}  // namespace capsnet
