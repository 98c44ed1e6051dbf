// Fused dynamic routing on the CPU: forward and backward, registered for the CPU key.
//
// Forward, one sample at a time (samples in parallel over ATen's thread pool):
//   u_hat = W u (Eq. 2) into a per-thread scratch buffer [N_in, N_out*D_out] (737 KB for
//   CapsNet in float32, so it stays in L2), then every routing iteration is ONE pass over
//   u_hat that updates the logits with the previous iteration's agreement, takes the
//   softmax (Eq. 3) and accumulates s (Eq. 2). Nothing batch-sized but the outputs is
//   allocated: v [B, N_out, D_out] and s_saved [B, r, N_out, D_out].
//
// Backward, in two deterministic phases (no atomics, no reduction whose order depends on
// the number of threads):
//   phase 1, per sample: recompute u_hat and the couplings c^t, then sweep the iterations
//     in reverse. The gradient of u_hat turns out to be a short linear combination of
//     per-sample vectors (see routing_backward_sample), so phase 1 stores only their
//     coefficients [B, N_in, 2r-1, N_out] and the vectors [B, 2r-1, N_out*D_out].
//   phase 2, per input capsule i, batch in a fixed order: rebuild grad u_hat[b, i] from
//     the coefficients and accumulate grad W[i] and grad u[:, i].
//
// Inner loops run over contiguous memory and are written for the compiler to vectorise
// (setup.py builds with -march and -fopenmp-simd).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "routing_checks.h"
#include "routing_math.h"

namespace capsnet {
namespace {

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) {
    acc += a[k] * b[k];
  }
  return acc;
}

// y += alpha * x
template <typename scalar_t>
inline void axpy(scalar_t alpha, const scalar_t* x, scalar_t* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    y[k] += alpha * x[k];
  }
}

// Capsule sizes as compile-time constants for the common shapes (CapsNet: D_out=16, D_in=8)
// so that the short loops over a capsule's components unroll; 0 means "known at run time".
template <int kDim>
constexpr int64_t capsule_dim(int64_t runtime_dim) {
  return kDim > 0 ? kDim : runtime_dim;
}

// Calls fn(std::integral_constant<int, D_out>, std::integral_constant<int, D_in>) with the
// sizes baked in where a specialisation exists, with 0 (run-time sizes) otherwise.
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

// u_hat[i, j*D_out + d] = sum_e W[i, j, d, e] u[i, e]   (Eq. 2), from W_t = W laid out as
// [N_in, D_in, N_out*D_out] so that the inner loop is a contiguous axpy of length N_out*D_out.
template <typename scalar_t, int kDimIn>
void compute_predictions(
    const scalar_t* u_sample, const scalar_t* W_t, scalar_t* u_hat, const RoutingShape& shape) {
  const int64_t dim_in = capsule_dim<kDimIn>(shape.dim_in);
  const int64_t out_size = shape.out_size();
  for (int64_t i = 0; i < shape.num_in; ++i) {
    const scalar_t* u_i = u_sample + i * dim_in;
    const scalar_t* W_i = W_t + i * dim_in * out_size;
    scalar_t* row = u_hat + i * out_size;
    // Vectorised over k, the sum over e kept in registers.
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

// One routing iteration over all input capsules of one sample:
//   logits[i, j] += u_hat[i, j] . v_prev[j]     (agreement of the previous iteration, if any)
//   c[i, :] = softmax(logits[i, :])              (Eq. 3)
//   s[j] += c[i, j] u_hat[i, j]                  (Eq. 2; skipped when s is null)
// and, when coupling_out is given, stores c[i, :] at coupling_out + i * coupling_stride.
template <typename scalar_t, int kDimOut>
void routing_pass(
    const scalar_t* u_hat, scalar_t* logits, const scalar_t* v_prev, scalar_t* s,
    scalar_t* coupling_out, int64_t coupling_stride, scalar_t* coupling_scratch,
    const RoutingShape& shape) {
  const int64_t num_out = shape.num_out;
  const int64_t dim = capsule_dim<kDimOut>(shape.dim_out);
  const int64_t out_size = shape.out_size();
  for (int64_t i = 0; i < shape.num_in; ++i) {
    const scalar_t* row = u_hat + i * out_size;
    scalar_t* logits_i = logits + i * num_out;
    if (v_prev != nullptr) {
      for (int64_t j = 0; j < num_out; ++j) {
        logits_i[j] += dot(row + j * dim, v_prev + j * dim, dim);
      }
    }
    scalar_t* c_i = coupling_out != nullptr ? coupling_out + i * coupling_stride : coupling_scratch;
    if (v_prev != nullptr) {
      softmax_row(logits_i, c_i, static_cast<int>(num_out));
    } else {
      // First iteration: all logits are 0 and softmax_row would give exactly 1/N_out
      // (exp(0) = 1, an exact integer sum); skip the N_out exp() calls.
      std::fill(c_i, c_i + num_out, scalar_t(1) / static_cast<scalar_t>(num_out));
    }
    if (s != nullptr) {
      for (int64_t j = 0; j < num_out; ++j) {
        axpy(c_i[j], row + j * dim, s + j * dim, dim);
      }
    }
  }
}

// Per-thread working memory for one sample.
template <typename scalar_t>
struct SampleScratch {
  std::vector<scalar_t> u_hat;     // [N_in, N_out*D_out]
  std::vector<scalar_t> logits;    // [N_in, N_out]
  std::vector<scalar_t> coupling;  // [N_out]
  std::vector<scalar_t> v;         // [N_out*D_out]
  std::vector<scalar_t> grad_v;    // [N_out*D_out]

  explicit SampleScratch(const RoutingShape& shape)
      : u_hat(shape.num_in * shape.out_size()),
        logits(shape.num_in * shape.num_out),
        coupling(shape.num_out),
        v(shape.out_size()),
        grad_v(shape.out_size()) {}
};

template <typename scalar_t, int kDimOut, int kDimIn>
void routing_forward_sample(
    const scalar_t* u_sample, const scalar_t* W_t, const scalar_t* bias, scalar_t* s_saved,
    scalar_t* v_out, SampleScratch<scalar_t>& scratch, const RoutingShape& shape) {
  const int64_t out_size = shape.out_size();
  compute_predictions<scalar_t, kDimIn>(u_sample, W_t, scratch.u_hat.data(), shape);
  std::fill(scratch.logits.begin(), scratch.logits.end(), scalar_t(0));  // logits start at 0
  for (int64_t t = 0; t < shape.iterations; ++t) {
    scalar_t* s = s_saved + t * out_size;
    std::fill(s, s + out_size, scalar_t(0));
    routing_pass<scalar_t, kDimOut>(
        scratch.u_hat.data(), scratch.logits.data(), t > 0 ? scratch.v.data() : nullptr, s,
        static_cast<scalar_t*>(nullptr), 0, scratch.coupling.data(), shape);
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
// where grad_b^{t+1} is the gradient of the logits entering iteration t+1. Both terms are
// a per-(i, j) scalar times a per-j vector, so we store
//   coeffs  [N_in, K, N_out], K = 2r-1:  c^0..c^{r-1}, then grad_b^1..grad_b^{r-1}
//   vectors [K, N_out*D_out]:           grad_s^0..grad_s^{r-1}, then v^0..v^{r-2}
// and phase 2 rebuilds grad u_hat[i] = sum_k coeffs[i, k, j] vectors[k, j, :].
template <typename scalar_t, int kDimOut, int kDimIn>
void routing_backward_sample(
    const scalar_t* u_sample, const scalar_t* W_t, const scalar_t* grad_v, const scalar_t* s_saved,
    scalar_t* coeffs, scalar_t* vectors, SampleScratch<scalar_t>& scratch,
    const RoutingShape& shape) {
  const int64_t r = shape.iterations;
  const int64_t num_out = shape.num_out;
  const int64_t dim = capsule_dim<kDimOut>(shape.dim_out);
  const int64_t out_size = shape.out_size();
  const int64_t coeff_stride = (2 * r - 1) * num_out;  // between input capsules
  scalar_t* u_hat = scratch.u_hat.data();
  compute_predictions<scalar_t, kDimIn>(u_sample, W_t, u_hat, shape);

  // Recompute the couplings of every iteration from the saved total inputs: v^t =
  // squash(s^t) is bitwise what the forward computed, so the logits and c^t are too.
  std::fill(scratch.logits.begin(), scratch.logits.end(), scalar_t(0));
  for (int64_t t = 0; t < r; ++t) {
    const scalar_t* v_prev = t > 0 ? vectors + (r + t - 1) * out_size : nullptr;
    routing_pass<scalar_t, kDimOut>(
        u_hat, scratch.logits.data(), v_prev, static_cast<scalar_t*>(nullptr), coeffs + t * num_out,
        coeff_stride, scratch.coupling.data(), shape);
    if (t < r - 1) {
      squash_capsules<scalar_t, kDimOut>(s_saved + t * out_size, vectors + (r + t) * out_size, shape);
    }
  }

  // Reverse sweep. grad_logits (reusing the logits buffer) accumulates dL/db^t over the
  // iterations already swept: b^{t+1} = b^t + agreement, so dL/db^t = dL/db^{t+1} + softmax
  // backward of iteration t.
  scalar_t* grad_logits = scratch.logits.data();
  std::fill(scratch.logits.begin(), scratch.logits.end(), scalar_t(0));
  std::copy(grad_v, grad_v + out_size, scratch.grad_v.data());
  scalar_t* grad_c = scratch.coupling.data();
  for (int64_t t = r - 1; t >= 0; --t) {
    // grad_s^t = squash backward of (s^t, grad_v^t)
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
      scalar_t* coeffs_i = coeffs + i * coeff_stride;
      const scalar_t* c_i = coeffs_i + t * num_out;
      scalar_t* grad_logits_i = grad_logits + i * num_out;
      for (int64_t j = 0; j < num_out; ++j) {
        grad_c[j] = dot(grad_s + j * dim, row + j * dim, dim);
      }
      const scalar_t c_dot_grad_c = softmax_row_dot(c_i, grad_c, static_cast<int>(num_out));
      scalar_t* beta = coeffs_i + (r + t - 1) * num_out;  // coefficient of v^{t-1}
      for (int64_t j = 0; j < num_out; ++j) {
        grad_logits_i[j] += c_i[j] * (grad_c[j] - c_dot_grad_c);
        beta[j] = grad_logits_i[j];
        axpy(grad_logits_i[j], row + j * dim, grad_v_prev + j * dim, dim);
      }
    }
    std::copy(grad_v_prev, grad_v_prev + out_size, scratch.grad_v.data());
  }
}

// Phase 2 for one input capsule i: for each sample b (in order),
//   g = grad u_hat[b, i] = sum_k coeffs[b, i, k, j] vectors[b, k, j, :]
//   grad_u[b, i, e] = sum_{j,d} W[i, j, d, e] g[j, d]
//   grad_W_t[i, e, :] += u[b, i, e] g
template <typename scalar_t, int kDimOut, int kDimIn>
void routing_backward_input_capsule(
    int64_t i, const scalar_t* u, const scalar_t* W_t, const scalar_t* coeffs,
    const scalar_t* vectors, scalar_t* grad_u, scalar_t* grad_W_t, scalar_t* g,
    const RoutingShape& shape) {
  const int64_t num_terms = 2 * shape.iterations - 1;
  const int64_t num_out = shape.num_out;
  const int64_t dim = capsule_dim<kDimOut>(shape.dim_out);
  const int64_t dim_in = capsule_dim<kDimIn>(shape.dim_in);
  const int64_t out_size = shape.out_size();
  const scalar_t* W_i = W_t + i * dim_in * out_size;
  scalar_t* grad_W_i = grad_W_t + i * dim_in * out_size;
  std::fill(grad_W_i, grad_W_i + dim_in * out_size, scalar_t(0));
  for (int64_t b = 0; b < shape.batch; ++b) {
    const scalar_t* coeffs_bi = coeffs + (b * shape.num_in + i) * num_terms * num_out;
    const scalar_t* vectors_b = vectors + b * num_terms * out_size;
    std::fill(g, g + out_size, scalar_t(0));
    for (int64_t k = 0; k < num_terms; ++k) {
      for (int64_t j = 0; j < num_out; ++j) {
        axpy(coeffs_bi[k * num_out + j], vectors_b + k * out_size + j * dim, g + j * dim, dim);
      }
    }
    const scalar_t* u_bi = u + (b * shape.num_in + i) * dim_in;
    scalar_t* grad_u_bi = grad_u + (b * shape.num_in + i) * dim_in;
    for (int64_t e = 0; e < dim_in; ++e) {
      grad_u_bi[e] = dot(W_i + e * out_size, g, out_size);
      axpy(u_bi[e], g, grad_W_i + e * out_size, out_size);
    }
  }
}

// [N_in, N_out, D_out, D_in] -> [N_in, D_in, N_out*D_out]
at::Tensor transpose_weights(const at::Tensor& W) {
  return W.permute({0, 3, 1, 2}).contiguous();
}

std::tuple<at::Tensor, at::Tensor> routing_forward_cpu(
    const at::Tensor& u_in, const at::Tensor& W_in, const std::optional<at::Tensor>& bias_in,
    int64_t num_iterations) {
  const RoutingShape shape = check_forward_inputs(u_in, W_in, bias_in, num_iterations);
  TORCH_CHECK(u_in.device().is_cpu(), "capsnet: routing_forward_cpu expects CPU tensors, got u on ", u_in.device());
  const at::Tensor u = u_in.contiguous();
  at::Tensor v = at::empty({shape.batch, shape.num_out, shape.dim_out}, u.options());
  at::Tensor s_saved =
      at::empty({shape.batch, shape.iterations, shape.num_out, shape.dim_out}, u.options());
  if (shape.batch == 0) {
    return {v, s_saved};
  }
  const at::Tensor W_t = transpose_weights(W_in);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_forward_cpu", [&] {
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* W_ptr = W_t.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* s_ptr = s_saved.mutable_data_ptr<scalar_t>();
    scalar_t* v_ptr = v.mutable_data_ptr<scalar_t>();
    dispatch_capsule_dims(shape, [&](auto dim_out, auto dim_in) {
      at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
        SampleScratch<scalar_t> scratch(shape);
        for (int64_t b = begin; b < end; ++b) {
          routing_forward_sample<scalar_t, dim_out.value, dim_in.value>(
              u_ptr + b * shape.num_in * shape.dim_in, W_ptr, bias_ptr,
              s_ptr + b * shape.iterations * shape.out_size(), v_ptr + b * shape.out_size(),
              scratch, shape);
        }
      });
    });
  });
  return {v, s_saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_backward_cpu(
    const at::Tensor& grad_v_in, const at::Tensor& u_in, const at::Tensor& W_in,
    const at::Tensor& s_saved_in) {
  const RoutingShape shape = check_backward_inputs(grad_v_in, u_in, W_in, s_saved_in);
  TORCH_CHECK(u_in.device().is_cpu(), "capsnet: routing_backward_cpu expects CPU tensors, got u on ", u_in.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor grad_v = grad_v_in.contiguous();
  const at::Tensor s_saved = s_saved_in.contiguous();
  at::Tensor grad_u = at::empty_like(u);
  at::Tensor grad_bias = at::zeros({shape.num_out, shape.dim_out}, u.options());
  if (shape.batch == 0) {
    return {grad_u, at::zeros_like(W_in, at::MemoryFormat::Contiguous), grad_bias};
  }
  const at::Tensor W_t = transpose_weights(W_in);
  at::Tensor grad_W_t = at::empty_like(W_t);
  const int64_t num_terms = 2 * shape.iterations - 1;
  at::Tensor coeffs = at::empty({shape.batch, shape.num_in, num_terms, shape.num_out}, u.options());
  at::Tensor vectors = at::empty({shape.batch, num_terms, shape.out_size()}, u.options());

  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet_routing_backward_cpu", [&] {
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* W_ptr = W_t.const_data_ptr<scalar_t>();
    const scalar_t* grad_v_ptr = grad_v.const_data_ptr<scalar_t>();
    const scalar_t* s_ptr = s_saved.const_data_ptr<scalar_t>();
    scalar_t* coeffs_ptr = coeffs.mutable_data_ptr<scalar_t>();
    scalar_t* vectors_ptr = vectors.mutable_data_ptr<scalar_t>();
    const int64_t out_size = shape.out_size();

    scalar_t* grad_u_ptr = grad_u.mutable_data_ptr<scalar_t>();
    scalar_t* grad_W_ptr = grad_W_t.mutable_data_ptr<scalar_t>();
    dispatch_capsule_dims(shape, [&](auto dim_out, auto dim_in) {
      // Phase 1: per sample.
      at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
        SampleScratch<scalar_t> scratch(shape);
        for (int64_t b = begin; b < end; ++b) {
          routing_backward_sample<scalar_t, dim_out.value, dim_in.value>(
              u_ptr + b * shape.num_in * shape.dim_in, W_ptr, grad_v_ptr + b * out_size,
              s_ptr + b * shape.iterations * out_size,
              coeffs_ptr + b * shape.num_in * num_terms * shape.num_out,
              vectors_ptr + b * num_terms * out_size, scratch, shape);
        }
      });
      // Phase 2: per input capsule, batch in a fixed order.
      at::parallel_for(0, shape.num_in, 16, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> g(out_size);
        for (int64_t i = begin; i < end; ++i) {
          routing_backward_input_capsule<scalar_t, dim_out.value, dim_in.value>(
              i, u_ptr, W_ptr, coeffs_ptr, vectors_ptr, grad_u_ptr, grad_W_ptr, g.data(), shape);
        }
      });
    });

    // grad bias = sum over samples and iterations of grad_s, in a fixed order.
    scalar_t* grad_bias_ptr = grad_bias.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < shape.batch; ++b) {
      for (int64_t t = 0; t < shape.iterations; ++t) {
        axpy(scalar_t(1), vectors_ptr + (b * num_terms + t) * out_size, grad_bias_ptr, out_size);
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
