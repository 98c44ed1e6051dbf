// Fused dynamic routing on the CPU: forward and backward, registered for the CPU key.
//
// Forward, a tile of kSampleTile samples at a time (tiles in parallel over ATen's pool):
//   u_hat = W u (Eq. 2) for the tile's samples in one sweep over W, into per-thread scratch
//   ([N_in, N_out*D_out] per sample: 737 KB for CapsNet in float32, so it stays in L2; W,
//   5.9 MB, is read once per tile instead of once per sample). Then, per sample, every
//   routing iteration is ONE pass over u_hat that updates the logits with the previous
//   iteration's agreement, takes the softmax (Eq. 3) and accumulates s (Eq. 2). Nothing
//   batch-sized is allocated besides the outputs: v [B, N_out, D_out] and the state for
//   backward, s_saved [B, r, N_out, D_out] and couplings [B, N_in, r, N_out].
//
// Backward, in two deterministic phases (no atomics, no reduction whose order depends on
// the number of threads):
//   phase 1, per sample: recompute u_hat and sweep the iterations in reverse. The gradient
//     of u_hat turns out to be a short linear combination of per-sample vectors (see
//     routing_backward_sample) whose coefficients are the saved couplings and the logit
//     gradients, [B, N_in, r-1, N_out]; phase 1 stores those and the vectors.
//   phase 2, per input capsule i, batch in a fixed order: rebuild grad u_hat[b, i] from
//     the coefficients and accumulate grad W[i] and grad u[:, i].
//
// Inner loops run over contiguous memory and are written for the compiler to vectorise
// (setup.py builds with -march and OpenMP simd); the capsule sizes of CapsNet are
// compile-time constants (dispatch_capsule_dims) so that their loops unroll.
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

// Samples whose predictions are computed in one sweep over W (two u_hat buffers of 737 KB
// still fit a 2 MB L2 beside the streamed W rows).
constexpr int64_t kSampleTile = 2;
// Input capsules routed together: a block's predictions (10 KB for CapsNet) stay in L1
// between the agreement and the weighted sum, and its exponentials form one vector loop.
constexpr int64_t kRowBlock = 16;
// Samples whose grad u_hat rows are combined per update of grad W[i] in phase 2, so that
// grad W[i] is loaded and stored once per tile instead of once per sample.
constexpr int64_t kGradTile = 4;

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

// Capsule sizes as compile-time constants where a specialisation exists; 0 = run time.
template <int kDim>
constexpr int64_t capsule_dim(int64_t runtime_dim) {
  return kDim > 0 ? kDim : runtime_dim;
}

// Calls fn(integral_constant<int, D_out>, integral_constant<int, D_in>) with the sizes
// baked in for CapsNet's capsules, with 0 (run-time sizes) otherwise.
template <typename Fn>
void dispatch_capsule_dims(const RoutingShape& shape, Fn&& fn) {
  using std::integral_constant;
  if (shape.dim_out == 16 && shape.dim_in == 8) {
    fn(integral_constant<int, 16>{}, integral_constant<int, 8>{});
  } else if (shape.dim_out == 8 && shape.dim_in == 8) {
    fn(integral_constant<int, 8>{}, integral_constant<int, 8>{});
  } else {
    fn(integral_constant<int, 0>{}, integral_constant<int, 0>{});
  }
}

// v_j = squash(s_j) for every output capsule j (Eq. 1).
template <typename scalar_t, int kDimOut>
void squash_capsules(const scalar_t* s, scalar_t* v, const RoutingShape& shape) {
  const int64_t dim = capsule_dim<kDimOut>(shape.dim_out);
  for (int64_t j = 0; j < shape.num_out; ++j) {
    const scalar_t* s_j = s + j * dim;
    const scalar_t scale = squash_scale(dot(s_j, s_j, dim));
    for (int64_t d = 0; d < dim; ++d) {
      v[j * dim + d] = scale * s_j[d];
    }
  }
}

// u_hat[n][i, j*D_out + d] = sum_e W[i, j, d, e] u[n][i, e]   (Eq. 2) for the `count`
// samples of a tile, from W_t = W laid out as [N_in, D_in, N_out*D_out] so that the
// vectorised loop runs over j*D_out + d with the sum over e in registers.
template <typename scalar_t, int kDimIn>
void compute_predictions(
    const scalar_t* const* u_samples, scalar_t* const* u_hat, int64_t count, const scalar_t* W_t,
    const RoutingShape& shape) {
  const int64_t dim_in = capsule_dim<kDimIn>(shape.dim_in);
  const int64_t out_size = shape.out_size();
  for (int64_t i = 0; i < shape.num_in; ++i) {
    const scalar_t* W_i = W_t + i * dim_in * out_size;
    for (int64_t n = 0; n < count; ++n) {
      const scalar_t* u_i = u_samples[n] + i * dim_in;
      scalar_t* row = u_hat[n] + i * out_size;
#pragma omp simd
      for (int64_t k = 0; k < out_size; ++k) {
        scalar_t acc = 0;
        for (int64_t e = 0; e < dim_in; ++e) {
          acc += u_i[e] * W_i[e * out_size + k];
        }
        row[k] = acc;
      }
    }
  }
}

// Softmax over each of `rows` rows of n logits (Eq. 3: over the output capsules of one
// input capsule), max-subtracted so that exp() cannot overflow. The exponentials of all
// rows go through one vectorised loop.
template <typename scalar_t>
void softmax_rows(const scalar_t* logits, scalar_t* coupling, int64_t rows, int64_t n) {
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* x = logits + row * n;
    scalar_t row_max = x[0];
    for (int64_t k = 1; k < n; ++k) {
      row_max = x[k] > row_max ? x[k] : row_max;
    }
    for (int64_t k = 0; k < n; ++k) {
      coupling[row * n + k] = x[k] - row_max;
    }
  }
  cpu::exp_inplace(coupling, rows * n);
  for (int64_t row = 0; row < rows; ++row) {
    scalar_t* c = coupling + row * n;
    scalar_t total = 0;
    for (int64_t k = 0; k < n; ++k) {
      total += c[k];
    }
    const scalar_t inv_total = scalar_t(1) / total;
    for (int64_t k = 0; k < n; ++k) {
      c[k] *= inv_total;
    }
  }
}

// One routing iteration over all input capsules of one sample:
//   logits[i, j] += u_hat[i, j] . v_prev[j]     (agreement of the previous iteration)
//   c[i, :] = softmax(logits[i, :])              (Eq. 3), stored at couplings + i * stride
//   s[j] += c[i, j] u_hat[i, j]                  (Eq. 2)
// v_prev == nullptr marks the first iteration, whose logits are all 0.
template <typename scalar_t, int kDimOut>
void routing_pass(
    const scalar_t* u_hat, scalar_t* logits, const scalar_t* v_prev, scalar_t* s,
    scalar_t* couplings, int64_t couplings_stride, scalar_t* coupling_block,
    const RoutingShape& shape) {
  const int64_t num_out = shape.num_out;
  const int64_t dim = capsule_dim<kDimOut>(shape.dim_out);
  const int64_t out_size = shape.out_size();
  for (int64_t block_start = 0; block_start < shape.num_in; block_start += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, shape.num_in - block_start);
    const scalar_t* block_u_hat = u_hat + block_start * out_size;
    scalar_t* block_logits = logits + block_start * num_out;
    if (v_prev != nullptr) {
      for (int64_t row = 0; row < rows; ++row) {
        for (int64_t j = 0; j < num_out; ++j) {
          block_logits[row * num_out + j] +=
              dot(block_u_hat + row * out_size + j * dim, v_prev + j * dim, dim);
        }
      }
      softmax_rows(block_logits, coupling_block, rows, num_out);
    } else {
      // softmax of all-zero logits: exactly 1/N_out (exp(0) = 1, an exact integer sum).
      std::fill(
          coupling_block, coupling_block + rows * num_out,
          scalar_t(1) / static_cast<scalar_t>(num_out));
    }
    for (int64_t row = 0; row < rows; ++row) {
      const scalar_t* c_i = coupling_block + row * num_out;
      std::copy(c_i, c_i + num_out, couplings + (block_start + row) * couplings_stride);
      const scalar_t* row_u_hat = block_u_hat + row * out_size;
      for (int64_t j = 0; j < num_out; ++j) {
        axpy(c_i[j], row_u_hat + j * dim, s + j * dim, dim);
      }
    }
  }
}

// Per-thread working memory for one tile of samples.
template <typename scalar_t>
struct TileScratch {
  std::vector<scalar_t> u_hat;           // [kSampleTile, N_in, N_out*D_out]
  std::vector<scalar_t> logits;          // [N_in, N_out]; backward: their gradient
  std::vector<scalar_t> coupling_block;  // [kRowBlock, N_out]; backward: grad of one row's c
  std::vector<scalar_t> v;               // [N_out*D_out]; backward: grad of the previous v
  std::vector<scalar_t> grad_v;          // [N_out*D_out]

  explicit TileScratch(const RoutingShape& shape)
      : u_hat(kSampleTile * shape.num_in * shape.out_size()),
        logits(shape.num_in * shape.num_out),
        coupling_block(kRowBlock * shape.num_out),
        v(shape.out_size()),
        grad_v(shape.out_size()) {}

  scalar_t* u_hat_of(int64_t n, const RoutingShape& shape) {
    return u_hat.data() + n * shape.num_in * shape.out_size();
  }
};

// Computes the predictions of samples [begin, end) (at most kSampleTile) into scratch.
template <typename scalar_t, int kDimIn>
void predict_tile(
    const scalar_t* u, const scalar_t* W_t, int64_t begin, int64_t end,
    TileScratch<scalar_t>& scratch, const RoutingShape& shape) {
  const scalar_t* u_samples[kSampleTile];
  scalar_t* u_hat[kSampleTile];
  for (int64_t b = begin; b < end; ++b) {
    u_samples[b - begin] = u + b * shape.num_in * shape.dim_in;
    u_hat[b - begin] = scratch.u_hat_of(b - begin, shape);
  }
  compute_predictions<scalar_t, kDimIn>(u_samples, u_hat, end - begin, W_t, shape);
}

template <typename scalar_t, int kDimOut>
void routing_forward_sample(
    const scalar_t* u_hat, const scalar_t* bias, scalar_t* s_saved, scalar_t* couplings,
    scalar_t* v_out, TileScratch<scalar_t>& scratch, const RoutingShape& shape) {
  const int64_t out_size = shape.out_size();
  const int64_t couplings_stride = shape.iterations * shape.num_out;  // between input capsules
  std::fill(scratch.logits.begin(), scratch.logits.end(), scalar_t(0));  // logits start at 0
  for (int64_t t = 0; t < shape.iterations; ++t) {
    scalar_t* s = s_saved + t * out_size;
    std::fill(s, s + out_size, scalar_t(0));
    routing_pass<scalar_t, kDimOut>(
        u_hat, scratch.logits.data(), t > 0 ? scratch.v.data() : nullptr, s,
        couplings + t * shape.num_out, couplings_stride, scratch.coupling_block.data(), shape);
    if (bias != nullptr) {
      axpy(scalar_t(1), bias, s, out_size);
    }
    squash_capsules<scalar_t, kDimOut>(s, scratch.v.data(), shape);
  }
  std::copy(scratch.v.begin(), scratch.v.end(), v_out);
}

// Phase 1 of backward for one sample. With 0-based iterations t = 0..r-1, the gradient of
// u_hat[i, j] is
//   sum_t c^t[i, j] grad_s^t[j]  +  sum_{t<r-1} grad_b^{t+1}[i, j] v^t[j],
// where grad_b^{t+1} is the gradient of the logits entering iteration t+1 (they add the
// agreement u_hat . v^t). Each term is a per-(i, j) scalar times a per-j vector, so phase 2
// can rebuild it from
//   couplings   [N_in, r, N_out]     c^0..c^{r-1}                       (saved by forward)
//   grad_logits [N_in, r-1, N_out]   grad_b^1..grad_b^{r-1}              (written here)
//   vectors     [2r-1, N_out*D_out]  grad_s^0..grad_s^{r-1}, v^0..v^{r-2} (written here)
template <typename scalar_t, int kDimOut>
void routing_backward_sample(
    const scalar_t* u_hat, const scalar_t* grad_v, const scalar_t* s_saved,
    const scalar_t* couplings, scalar_t* grad_logits_out, scalar_t* vectors,
    TileScratch<scalar_t>& scratch, const RoutingShape& shape) {
  const int64_t r = shape.iterations;
  const int64_t num_out = shape.num_out;
  const int64_t dim = capsule_dim<kDimOut>(shape.dim_out);
  const int64_t out_size = shape.out_size();
  for (int64_t t = 0; t + 1 < r; ++t) {
    // v^t = squash(s^t): bitwise what the forward computed from the same s^t.
    squash_capsules<scalar_t, kDimOut>(s_saved + t * out_size, vectors + (r + t) * out_size, shape);
  }

  // Reverse sweep. grad_logits accumulates dL/db^t over the iterations already swept:
  // b^{t+1} = b^t + agreement, so dL/db^t = dL/db^{t+1} + (softmax backward of iteration t).
  scalar_t* grad_logits = scratch.logits.data();
  std::fill(scratch.logits.begin(), scratch.logits.end(), scalar_t(0));
  std::copy(grad_v, grad_v + out_size, scratch.grad_v.data());
  scalar_t* grad_c = scratch.coupling_block.data();
  for (int64_t t = r - 1; t >= 0; --t) {
    // grad_s^t: squash backward at (s^t, grad_v^t), see routing_math.h.
    const scalar_t* s = s_saved + t * out_size;
    scalar_t* grad_s = vectors + t * out_size;
    for (int64_t j = 0; j < num_out; ++j) {
      const scalar_t* s_j = s + j * dim;
      const scalar_t* gv_j = scratch.grad_v.data() + j * dim;
      const scalar_t sq_norm = dot(s_j, s_j, dim);
      const scalar_t scale = squash_scale(sq_norm);
      const scalar_t outer = squash_grad_outer_coeff(sq_norm) * dot(s_j, gv_j, dim);
      for (int64_t d = 0; d < dim; ++d) {
        grad_s[j * dim + d] = scale * gv_j[d] + outer * s_j[d];
      }
    }
    if (t == 0) {
      break;  // the logits of iteration 0 are the constant 0: nothing more flows back
    }
    // One pass over u_hat: softmax backward of iteration t, then the gradient of v^{t-1}
    // through the agreement that produced b^t.
    scalar_t* grad_v_prev = scratch.v.data();
    std::fill(grad_v_prev, grad_v_prev + out_size, scalar_t(0));
    for (int64_t i = 0; i < shape.num_in; ++i) {
      const scalar_t* row = u_hat + i * out_size;
      const scalar_t* c_i = couplings + (i * r + t) * num_out;
      scalar_t* grad_logits_i = grad_logits + i * num_out;
      for (int64_t j = 0; j < num_out; ++j) {
        grad_c[j] = dot(grad_s + j * dim, row + j * dim, dim);
      }
      const scalar_t c_dot_grad_c = softmax_row_dot(c_i, grad_c, static_cast<int>(num_out));
      scalar_t* saved = grad_logits_out + (i * (r - 1) + (t - 1)) * num_out;  // pairs with v^{t-1}
      for (int64_t j = 0; j < num_out; ++j) {
        grad_logits_i[j] += c_i[j] * (grad_c[j] - c_dot_grad_c);
        saved[j] = grad_logits_i[j];
        axpy(grad_logits_i[j], row + j * dim, grad_v_prev + j * dim, dim);
      }
    }
    std::copy(grad_v_prev, grad_v_prev + out_size, scratch.grad_v.data());
  }
}

// Phase 2 for one input capsule i: for the samples b in order, in tiles of kGradTile,
//   g_b = grad u_hat[b, i] = sum_t c^t[b,i,j] grad_s^t[b,j,:] + sum_t grad_b^{t+1}[b,i,j] v^t[b,j,:]
//   grad_u[b, i, e] = sum_{j,d} W[i, j, d, e] g_b[j, d]
//   grad_W_t[i, e, :] += u[b, i, e] g_b        (summed over b in order: deterministic)
template <typename scalar_t, int kDimOut, int kDimIn>
void routing_backward_input_capsule(
    int64_t i, const scalar_t* u, const scalar_t* W_t, const scalar_t* couplings,
    const scalar_t* grad_logits, const scalar_t* vectors, scalar_t* grad_u, scalar_t* grad_W_t,
    scalar_t* g_tile, const RoutingShape& shape) {
  const int64_t r = shape.iterations;
  const int64_t num_vectors = 2 * r - 1;
  const int64_t num_out = shape.num_out;
  const int64_t dim = capsule_dim<kDimOut>(shape.dim_out);
  const int64_t dim_in = capsule_dim<kDimIn>(shape.dim_in);
  const int64_t out_size = shape.out_size();
  const scalar_t* W_i = W_t + i * dim_in * out_size;
  scalar_t* grad_W_i = grad_W_t + i * dim_in * out_size;
  std::fill(grad_W_i, grad_W_i + dim_in * out_size, scalar_t(0));
  for (int64_t tile_start = 0; tile_start < shape.batch; tile_start += kGradTile) {
    const int64_t tile = std::min(kGradTile, shape.batch - tile_start);
    for (int64_t n = 0; n < tile; ++n) {
      const int64_t b = tile_start + n;
      const scalar_t* c_bi = couplings + (b * shape.num_in + i) * r * num_out;
      const scalar_t* gl_bi = grad_logits + (b * shape.num_in + i) * (r - 1) * num_out;
      const scalar_t* vectors_b = vectors + b * num_vectors * out_size;
      scalar_t* g = g_tile + n * out_size;
      for (int64_t j = 0; j < num_out; ++j) {
        scalar_t* g_j = g + j * dim;
        std::fill(g_j, g_j + dim, scalar_t(0));
        for (int64_t t = 0; t < r; ++t) {
          axpy(c_bi[t * num_out + j], vectors_b + t * out_size + j * dim, g_j, dim);
        }
        for (int64_t t = 0; t + 1 < r; ++t) {
          axpy(gl_bi[t * num_out + j], vectors_b + (r + t) * out_size + j * dim, g_j, dim);
        }
      }
      const scalar_t* u_bi = u + (b * shape.num_in + i) * dim_in;
      scalar_t* grad_u_bi = grad_u + (b * shape.num_in + i) * dim_in;
      for (int64_t e = 0; e < dim_in; ++e) {
        grad_u_bi[e] = dot(W_i + e * out_size, g, out_size);
      }
    }
    for (int64_t e = 0; e < dim_in; ++e) {
      scalar_t* grad_W_ie = grad_W_i + e * out_size;
      for (int64_t n = 0; n < tile; ++n) {
        const scalar_t u_bie = u[((tile_start + n) * shape.num_in + i) * dim_in + e];
        axpy(u_bie, g_tile + n * out_size, grad_W_ie, out_size);
      }
    }
  }
}

// [N_in, N_out, D_out, D_in] -> [N_in, D_in, N_out*D_out]
at::Tensor transpose_weights(const at::Tensor& W) {
  return W.permute({0, 3, 1, 2}).contiguous();
}

int64_t num_tiles(int64_t batch) {
  return (batch + kSampleTile - 1) / kSampleTile;
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
      at::empty({shape.batch, shape.num_in, shape.iterations, shape.num_out}, u.options());
  if (shape.batch == 0) {
    return {v, s_saved, couplings};
  }
  const at::Tensor W_t = transpose_weights(W_in);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_forward_cpu", [&] {
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* W_ptr = W_t.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* s_ptr = s_saved.mutable_data_ptr<scalar_t>();
    scalar_t* couplings_ptr = couplings.mutable_data_ptr<scalar_t>();
    scalar_t* v_ptr = v.mutable_data_ptr<scalar_t>();
    const int64_t out_size = shape.out_size();
    dispatch_capsule_dims(shape, [&](auto dim_out, auto dim_in) {
      at::parallel_for(0, num_tiles(shape.batch), 1, [&](int64_t tile_begin, int64_t tile_end) {
        TileScratch<scalar_t> scratch(shape);
        for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
          const int64_t begin = tile * kSampleTile;
          const int64_t end = std::min(begin + kSampleTile, shape.batch);
          predict_tile<scalar_t, dim_in.value>(u_ptr, W_ptr, begin, end, scratch, shape);
          for (int64_t b = begin; b < end; ++b) {
            routing_forward_sample<scalar_t, dim_out.value>(
                scratch.u_hat_of(b - begin, shape), bias_ptr,
                s_ptr + b * shape.iterations * out_size,
                couplings_ptr + b * shape.num_in * shape.iterations * shape.num_out,
                v_ptr + b * out_size, scratch, shape);
          }
        }
      });
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
  const at::Tensor W_t = transpose_weights(W_in);
  at::Tensor grad_W_t = at::empty_like(W_t);
  at::Tensor grad_logits = at::empty({shape.batch, shape.num_in, r - 1, shape.num_out}, u.options());
  at::Tensor vectors = at::empty({shape.batch, num_vectors, out_size}, u.options());

  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_backward_cpu", [&] {
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* W_ptr = W_t.const_data_ptr<scalar_t>();
    const scalar_t* grad_v_ptr = grad_v.const_data_ptr<scalar_t>();
    const scalar_t* s_ptr = s_saved.const_data_ptr<scalar_t>();
    const scalar_t* couplings_ptr = couplings.const_data_ptr<scalar_t>();
    scalar_t* grad_logits_ptr = grad_logits.mutable_data_ptr<scalar_t>();
    scalar_t* vectors_ptr = vectors.mutable_data_ptr<scalar_t>();
    scalar_t* grad_u_ptr = grad_u.mutable_data_ptr<scalar_t>();
    scalar_t* grad_W_ptr = grad_W_t.mutable_data_ptr<scalar_t>();
    dispatch_capsule_dims(shape, [&](auto dim_out, auto dim_in) {
      // Phase 1: per sample (tiles of samples share the sweep over W).
      at::parallel_for(0, num_tiles(shape.batch), 1, [&](int64_t tile_begin, int64_t tile_end) {
        TileScratch<scalar_t> scratch(shape);
        for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
          const int64_t begin = tile * kSampleTile;
          const int64_t end = std::min(begin + kSampleTile, shape.batch);
          predict_tile<scalar_t, dim_in.value>(u_ptr, W_ptr, begin, end, scratch, shape);
          for (int64_t b = begin; b < end; ++b) {
            routing_backward_sample<scalar_t, dim_out.value>(
                scratch.u_hat_of(b - begin, shape), grad_v_ptr + b * out_size,
                s_ptr + b * r * out_size, couplings_ptr + b * shape.num_in * r * shape.num_out,
                grad_logits_ptr + b * shape.num_in * (r - 1) * shape.num_out,
                vectors_ptr + b * num_vectors * out_size, scratch, shape);
          }
        }
      });
      // Phase 2: per input capsule, batch in a fixed order.
      at::parallel_for(0, shape.num_in, 16, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> g_tile(kGradTile * out_size);
        for (int64_t i = begin; i < end; ++i) {
          routing_backward_input_capsule<scalar_t, dim_out.value, dim_in.value>(
              i, u_ptr, W_ptr, couplings_ptr, grad_logits_ptr, vectors_ptr, grad_u_ptr,
              grad_W_ptr, g_tile.data(), shape);
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

  // [N_in, D_in, N_out*D_out] -> [N_in, N_out, D_out, D_in]
  at::Tensor grad_W = grad_W_t.view({shape.num_in, shape.dim_in, shape.num_out, shape.dim_out})
                          .permute({0, 2, 3, 1})
                          .contiguous();
  return {grad_u, grad_W, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(capsnet, CPU, m) {
  m.impl("routing_forward", &routing_forward_cpu);
  m.impl("routing_backward", &routing_backward_cpu);
}

}  // namespace capsnet
