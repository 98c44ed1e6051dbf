// The backward kernels of the fused dynamic routing. docs/CUDA.md explains the design.
//
// The forward saved only s_k; u_hat and the couplings are recomputed here, by the same
// device functions as in the forward (predict, routing_logit, exchange_coupling,
// add_squashed), so the couplings are bitwise those of the forward.
//
// Reverse sweep, G_r = 0, for m = r-1 .. 1 (and m = 0 with a logit prior, for grad_prior):
//   dL/dv_m = (m == r-1) ? grad_v : sum_i G_{m+1}[i, j] u_hat[j|i]    (b_{m+1} = b_m + <u_hat, v_m>)
//   gs_m    = squash backward of dL/dv_m at s_m                        (Eq. 1)
//   gc_m    = <gs_m[j], u_hat[j|i]>,  G_m = G_{m+1} + c_m (gc_m - <c_m, gc_m>)   (Eq. 3 backward)
// then dL/du_hat[j|i] = sum_k c_k gs_k + sum_{m>=1} G_m v_{m-1} (BackwardTerms, routing_layout.h),
//   dL/dW[i] = sum_b dL/du_hat[b, i] (outer) u[b, i],  dL/du[b, i] = sum_j W[i, j]^T dL/du_hat[b, i, j],
//   dL/dbias = sum_b sum_k gs_k[b],  dL/dprior = sum_b G_0[b].
// detach_routing: the couplings are constants, dL/du_hat = c_{r-1} gs_{r-1}: one squash
// backward, one pass that recomputes c_{r-1}, and the gradient kernels on one term.
#pragma once

#include "routing_forward.cuh"

namespace capsnet::cuda {

// What a sweep pass computes (backward_partial_sums_kernel).
enum class SweepPass {
  kLogitGrads,     // m >= 1: c_m, G_m and the partial sums of dL/dv_{m-1}
  kPriorGrads,     // m = 0 with a logit prior: G_0 (c_0 is the prior's, no exchange)
  kCouplingsOnly,  // detach_routing, m = r-1: c_{r-1}
};

template <typename scalar_t>
struct BackwardParams {
  using acc_t = opmath_t<scalar_t>;
  RoutingGeometry geometry;
  RoutingOptions options;
  BackwardTerms terms_of;
  const scalar_t* grad_v;        // [B, J, D]
  const scalar_t* u;             // [B, I, E]
  const scalar_t* W;             // [I, J, D, E]
  const scalar_t* logit_prior;   // [I, J] or nullptr
  const acc_t* prior_couplings;  // [I, J]: c_0 from the prior, or nullptr
  const acc_t* s_saved;          // [B, r, J, D]
  acc_t* agreement;              // [B, r, J, D]        workspace: V_k (k >= 1)
  acc_t* terms;                  // [B, terms, J, D]    workspace: gs_k and v_k
  acc_t* coefficients;           // [slots, I, J, B]    workspace: c_m and G_m
  acc_t* partials;               // [B, chunks, J, D]   workspace: partial sums of dL/dv_{m-1}
  scalar_t* grad_u;              // [B, I, E]           output
  scalar_t* grad_W;              // [I, J, D, E]        output
  scalar_t* grad_bias;           // [J, D]              output
  scalar_t* grad_prior;          // [I, J]              output, or nullptr
  int iteration;                 // m (sweep) or k (squash)
};

// gs_k[b, j] = squash backward at s_k of dL/dv_k (grad_v at k = r-1, else the sum of the
// chunks' partial sums in chunk order), into its term vector. The first launch (k = r-1)
// also recomputes the per-sample state: V_m (m = 1..r-1) as the forward did, and v_m for
// the terms. Grid (B, ceil(J / blockDim.x)): one thread per output capsule.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(kColumnKernelMaxThreads) backward_squash_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kDim = Tile::kMaxDimOut;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const int64_t b = blockIdx.x;
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int k = p.iteration;
  if (j >= n.num_out) {
    return;
  }
  const bool last = k + 1 == n.iterations;
  if (last) {
    acc_t V[kDim];
    fill(V, acc_t(0));
    for (int t = 0; t + 1 < n.iterations; ++t) {  // model-loop: iterations - 1
      acc_t s[kDim];
      load_vector<Tile::kExactDimOut>(p.s_saved + g.iteration_vector(b, t, j), n.dim_out, s);
      const auto component = [&](auto d) { return s[d]; };
      if (!p.options.detach_routing) {
        const SquashCoefficients<acc_t> coefficients = squash_coefficients<kDim, acc_t>(component, n.dim_out);
        acc_t* v = p.terms + g.term_vector(b, p.terms_of.squashed_term(t), j);
        squash_forward<kDim>(coefficients, component, n.dim_out, [&](auto d, acc_t value) { v[d] = value; });
      }
      add_squashed(component, n.dim_out, V);
      store_vector(V, n.dim_out, p.agreement + g.iteration_vector(b, t + 1, j));
    }
  }
  acc_t grad[kDim];
  fill(grad, acc_t(0));
  if (last) {
    const scalar_t* grad_v = p.grad_v + g.output_vector(b, j);
#pragma unroll
    for (int d = 0; d < kDim; ++d) {
      if (d < n.dim_out) {
        grad[d] = static_cast<acc_t>(grad_v[d]);
      }
    }
  } else {
    for (int64_t chunk = 0; chunk < g.part.num_chunks; ++chunk) {  // model-loop: num_chunks
      const acc_t* partial = p.partials + g.partial_vector(b, chunk, j);
#pragma unroll
      for (int d = 0; d < kDim; ++d) {
        if (d < n.dim_out) {
          grad[d] += partial[d];
        }
      }
    }
  }
  acc_t s[kDim];
  load_vector<Tile::kExactDimOut>(p.s_saved + g.iteration_vector(b, k, j), n.dim_out, s);
  const auto component = [&](auto d) { return s[d]; };
  const SquashCoefficients<acc_t> coefficients = squash_coefficients<kDim, acc_t>(component, n.dim_out);
  acc_t* grad_s = p.terms + g.term_vector(b, p.terms_of.grad_s_term(k), j);
  squash_backward<kDim>(
      coefficients, component, [&](auto d) { return grad[d]; }, n.dim_out,
      [&](auto d, acc_t value) { grad_s[d] = value; });
}

// Sweep pass m. Per input capsule i of the chunk and thread (sample, j), with u_hat and
// c_m recomputed:
//   full, m >= 1: stores c_m and G_m, and partials[b, chunk, j, :] = sum_i G_m u_hat[j|i]
//                 (part of dL/dv_{m-1});
//   full, m = 0 (a logit prior only): stores G_0, whose batch sum is grad_prior;
//   detach_routing (m = r-1): stores c_{r-1}.
// Grid and block as forward_partial_sums_kernel; one instantiation per kind of pass.
template <typename scalar_t, typename Tile, SweepPass kPass>
__global__ void __launch_bounds__(Tile::kMaxThreads) backward_partial_sums_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const RoutingThread t = RoutingThread::locate(g);
  const int m = p.iteration;
  const BackwardTerms& terms = p.terms_of;
  constexpr bool kDetach = kPass == SweepPass::kCouplingsOnly;
  CapsuleExchange<acc_t> exchange{dynamic_shared_memory<acc_t>(), g.part.samples_per_block, int(n.num_out)};

  constexpr bool kExact = Tile::kExactDimOut;
  const int dim_out = int(n.dim_out), dim_in = int(n.dim_in);

  acc_t agreement[Tile::kMaxDimOut];  // V_m
  acc_t grad_s[Tile::kMaxDimOut];     // gs_m
  fill(agreement, acc_t(0));
  fill(grad_s, acc_t(0));
  if (t.active) {
    if (kPass != SweepPass::kPriorGrads) {
      load_vector<kExact>(p.agreement + g.iteration_vector(t.b, m, t.j), dim_out, agreement);
    }
    if (!kDetach) {
      load_vector<kExact>(p.terms + g.term_vector(t.b, terms.grad_s_term(m), t.j), dim_out, grad_s);
    }
  }
  const bool has_later_logits = !kDetach && m + 1 < n.iterations;  // else G_{m+1} = 0
  constexpr bool kSumsGradV = kPass == SweepPass::kLogitGrads;

  // Pointers walked along the chunk, as in forward_partial_sums_kernel. Lanes past the
  // batch read the last sample's rows and store nothing.
  const int64_t b = t.active ? t.b : n.batch - 1;
  const scalar_t* u_row = p.u + g.input_row(b, t.i_begin);
  const scalar_t* W_ij = p.W + g.weight_matrix(t.i_begin, t.j);
  const int64_t W_step = n.num_out * n.dim_out * n.dim_in;
  const scalar_t* prior = p.logit_prior != nullptr ? p.logit_prior + g.pair(t.i_begin, t.j) : nullptr;
  const acc_t* initial = p.prior_couplings != nullptr ? p.prior_couplings + g.pair(t.i_begin, t.j) : nullptr;
  const acc_t uniform = uniform_coupling<acc_t>(n.num_out, p.options);
  const int64_t coefficient_step = n.num_out * n.batch;  // one input capsule further
  // Only the slots this pass writes exist (BackwardTerms): no pointer into a missing one.
  acc_t* coupling_out = (kSumsGradV || kDetach)
      ? p.coefficients + g.coefficient(terms.coupling_slot(m), t.i_begin, t.j, b) : nullptr;
  acc_t* logit_grad_out = !kDetach ? p.coefficients + g.coefficient(terms.logit_grad_slot(m), t.i_begin, t.j, b) : nullptr;
  const acc_t* later_logit_grad =
      has_later_logits ? p.coefficients + g.coefficient(terms.logit_grad_slot(m + 1), t.i_begin, t.j, b) : nullptr;

  acc_t grad_v_partial[Tile::kMaxDimOut];
  fill(grad_v_partial, acc_t(0));
  for (int64_t i = t.i_begin; i < t.i_end; ++i) {  // model-loop: inputs_per_chunk
    acc_t u_i[Tile::kMaxDimIn];
    load_row<Tile>(u_row, dim_in, u_i);
    acc_t u_hat[Tile::kMaxDimOut];
    predict<Tile>(W_ij, u_i, dim_out, dim_in, u_hat);
    u_row += n.dim_in;
    W_ij += W_step;
    acc_t c;
    if constexpr (kPass == SweepPass::kPriorGrads) {
      c = initial != nullptr ? *initial : uniform;
      initial = initial != nullptr ? initial + n.num_out : nullptr;
    } else {
      const acc_t prior_ij = prior != nullptr ? static_cast<acc_t>(*prior) : acc_t(0);
      prior = prior != nullptr ? prior + n.num_out : nullptr;
      c = exchange_coupling(exchange, t.lane, t.j, routing_logit<kExact>(u_hat, agreement, dim_out, prior_ij), p.options);
    }
    if constexpr (kDetach) {
      if (t.active) {
        *coupling_out = c;
      }
      coupling_out += coefficient_step;
      continue;
    }
    const acc_t grad_c = dot<kExact>(grad_s, u_hat, dim_out);
    const acc_t row_dot = exchange.sum(exchange.gather(t.lane, t.j, c * grad_c), acc_t(0));
    acc_t logit_grad = coupling_logit_grad(c, grad_c, row_dot);
    if (has_later_logits) {
      logit_grad += *later_logit_grad;  // a lane past the batch reads sample B-1's: harmless
      later_logit_grad += coefficient_step;
    }
    if (t.active) {
      if constexpr (kSumsGradV) {
        *coupling_out = c;
      }
      *logit_grad_out = logit_grad;
    }
    if constexpr (kSumsGradV) {
      coupling_out += coefficient_step;
    }
    logit_grad_out += coefficient_step;
    if constexpr (kSumsGradV) {
#pragma unroll
      for (int d = 0; d < Tile::kMaxDimOut; ++d) {
        grad_v_partial[d] = fused_multiply_add(logit_grad, u_hat[d], grad_v_partial[d]);
      }
    }
  }
  if (kSumsGradV && t.active) {
    store_vector(grad_v_partial, n.dim_out, p.partials + g.partial_vector(t.b, t.chunk, t.j));
  }
}

// x[d] = dL/du_hat[b, i, j, row + d], d < kRows: the sum of the product terms (BackwardTerms),
// term by term in order. `coefficients` points at (slot 0, i, j, b), `vectors` at
// (b, term 0, j, row); `initial` is c_0[i, j].
template <bool kExact, int kRows, typename acc_t>
__device__ __forceinline__ void grad_prediction(
    const BackwardTerms& terms, int count, const acc_t* __restrict__ coefficients, int64_t slot_stride, acc_t initial,
    const acc_t* __restrict__ vectors, int64_t term_stride, int rows, acc_t (&x)[kRows]) {
  fill(x, acc_t(0));
  for (int term = 0; term < count; ++term) {  // model-loop: terms
    const acc_t coefficient =
        terms.stored_coefficient(term) ? coefficients[terms.slot_of_term(term) * slot_stride] : initial;
    acc_t vector[kRows];
    load_vector<kExact>(vectors + term * term_stride, rows, vector);
#pragma unroll
    for (int d = 0; d < kRows; ++d) {
      x[d] = fused_multiply_add(coefficient, vector[d], x[d]);
    }
  }
}

// dL/dW[i, j, d, :] = sum_b dL/du_hat[b, i, j, d] u[b, i, :]  (Eq. 2), and grad_prior[i, j] =
// sum_b G_0[b, i, j]. Grid (ceil(I / 32), J, row-group blocks), block (32 inputs, row
// groups, sample groups): thread (lane, y, z) owns input i = 32 blockIdx.x + lane, rows
// [kRows * group, + kRows) of dW[i, j] and samples b = z, z + Z, ...; the sample groups'
// sums meet in shared memory and are added in group order (no atomics: fixed order).
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(kGradWeightMaxThreads) grad_weight_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kRows = Tile::kGradWeightRows;
  constexpr int kDimIn = Tile::kMaxDimIn;
  constexpr bool kExact = Tile::kExactDimOut;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const BackwardTerms& terms = p.terms_of;
  const int64_t i = int64_t(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t j = blockIdx.y;
  const int64_t row = (int64_t(blockIdx.z) * blockDim.y + threadIdx.y) * kRows;
  const bool active = i < n.num_in && row < n.dim_out;
  const int group = threadIdx.z;
  const int groups = blockDim.z;
  const bool sums_prior = p.grad_prior != nullptr && row == 0;
  const int rows = int(smaller(int64_t(kRows), n.dim_out - row));

  acc_t grad_w[kRows][kDimIn];
#pragma unroll
  for (int d = 0; d < kRows; ++d) {
    fill(grad_w[d], acc_t(0));
  }
  acc_t grad_prior = 0;
  if (active && group < n.batch) {
    // Pointers walked over this group's samples.
    const int64_t slot_stride = n.num_in * n.num_out * n.batch;
    const acc_t* coefficients = p.coefficients != nullptr ? p.coefficients + g.coefficient(0, i, j, group) : nullptr;
    const acc_t* vectors = p.terms + g.term_vector(group, 0, j) + row;
    const scalar_t* u_row = p.u + g.input_row(group, i);
    const int64_t vectors_step = groups * g.part.terms * g.columns();
    const int64_t u_step = groups * n.num_in * n.dim_in;
    const acc_t initial = initial_coupling(p.prior_couplings, g, i, j, p.options);
    const int64_t prior_slot = terms.logit_grad_slot(0) * slot_stride;
    for (int64_t b = group; b < n.batch; b += groups) {  // model-loop: ceil(batch / sample_groups)
      acc_t x[kRows];
      grad_prediction<kExact>(terms, g.part.terms, coefficients, slot_stride, initial, vectors, g.columns(), rows, x);
      acc_t u_i[kDimIn];
      load_row<Tile>(u_row, n.dim_in, u_i);
#pragma unroll
      for (int d = 0; d < kRows; ++d) {
#pragma unroll
        for (int e = 0; e < kDimIn; ++e) {
          grad_w[d][e] = fused_multiply_add(x[d], u_i[e], grad_w[d][e]);
        }
      }
      if (sums_prior) {
        grad_prior += coefficients[prior_slot];
      }
      coefficients = coefficients != nullptr ? coefficients + groups : nullptr;
      vectors += vectors_step;
      u_row += u_step;
    }
  }

  // Sum over the sample groups, one row of kDimIn values per round: group z writes its
  // row, group 0 adds them in order z = 0..Z-1.
  acc_t* shared = dynamic_shared_memory<acc_t>();
  const int xy = threadIdx.y * blockDim.x + threadIdx.x;
  const int xy_threads = blockDim.x * blockDim.y;
#pragma unroll
  for (int d = 0; d <= kRows; ++d) {  // the last round carries grad_prior
    if (groups > 1) {
      acc_t* mine = shared + (int64_t(group) * xy_threads + xy) * kDimIn;
      if (d < kRows) {
#pragma unroll
        for (int e = 0; e < kDimIn; ++e) {
          mine[e] = grad_w[d][e];
        }
      } else {
        mine[0] = grad_prior;
      }
      __syncthreads();
      if (group == 0) {
        for (int other = 1; other < groups; ++other) {  // model-loop: sample_groups - 1
          const acc_t* theirs = shared + (int64_t(other) * xy_threads + xy) * kDimIn;
          if (d < kRows) {
#pragma unroll
            for (int e = 0; e < kDimIn; ++e) {
              grad_w[d][e] += theirs[e];
            }
          } else {
            grad_prior += theirs[0];
          }
        }
      }
      __syncthreads();  // read before the next round overwrites
    }
    if (group == 0 && active) {
      if (d < kRows) {
        if (d < rows) {
          scalar_t* out = p.grad_W + g.weight_matrix(i, j) + (row + d) * n.dim_in;
#pragma unroll
          for (int e = 0; e < kDimIn; ++e) {
            if (Tile::kExactDimIn || e < n.dim_in) {
              out[e] = static_cast<scalar_t>(grad_w[d][e]);
            }
          }
        }
      } else if (sums_prior) {
        p.grad_prior[g.pair(i, j)] = static_cast<scalar_t>(grad_prior);
      }
    }
  }
}

// dL/du[b, i] = sum_j W[i, j]^T dL/du_hat[b, i, j]  (Eq. 2). Grid and block as the routing
// kernels: thread (lane, j) computes W[i, j]^T dL/du_hat[j|i] for its sample; the sum over j
// meets in shared memory ([slice][J][lanes]), p.geometry.part.grad_input_slice input
// dimensions per round, and is added in the order j = 0..J-1.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(Tile::kMaxThreads) grad_input_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr bool kExact = Tile::kExactDimOut;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const RoutingThread t = RoutingThread::locate(g);
  const int lanes = g.part.samples_per_block;
  const int slice = g.part.grad_input_slice;
  const int dim_out = int(n.dim_out), dim_in = int(n.dim_in), num_out = int(n.num_out);
  acc_t* per_capsule = dynamic_shared_memory<acc_t>();

  // Pointers walked along the chunk; lanes past the batch read sample B-1 and store nothing.
  const int64_t b = t.active ? t.b : n.batch - 1;
  const int64_t slot_stride = n.num_in * n.num_out * n.batch;
  const int64_t coefficient_step = n.num_out * n.batch;
  const acc_t* coefficients = p.coefficients != nullptr ? p.coefficients + g.coefficient(0, t.i_begin, t.j, b) : nullptr;
  const acc_t* vectors = p.terms + g.term_vector(b, 0, t.j);
  const scalar_t* W_ij = p.W + g.weight_matrix(t.i_begin, t.j);
  const int64_t W_step = n.num_out * n.dim_out * n.dim_in;
  const int row_stride = Tile::kExactDimIn ? Tile::kMaxDimIn : dim_in;
  scalar_t* grad_u = p.grad_u + g.input_row(b, t.i_begin);

  for (int64_t i = t.i_begin; i < t.i_end; ++i) {  // model-loop: inputs_per_chunk
    acc_t x[Tile::kMaxDimOut];
    grad_prediction<kExact>(
        p.terms_of, g.part.terms, coefficients, slot_stride, initial_coupling(p.prior_couplings, g, i, t.j, p.options),
        vectors, g.columns(), dim_out, x);
    // This capsule's term of dL/du[b, i]: W[i, j]^T dL/du_hat[j|i].
    acc_t term[Tile::kMaxDimIn];
    fill(term, acc_t(0));
#pragma unroll
    for (int d = 0; d < Tile::kMaxDimOut; ++d) {
      if (kExact || d < dim_out) {
        acc_t w[Tile::kMaxDimIn];
        load_row<Tile>(W_ij + d * row_stride, dim_in, w);
#pragma unroll
        for (int e = 0; e < Tile::kMaxDimIn; ++e) {
          term[e] = fused_multiply_add(w[e], x[d], term[e]);
        }
      }
    }
    coefficients = coefficients != nullptr ? coefficients + coefficient_step : nullptr;
    W_ij += W_step;
    for (int first = 0; first < dim_in; first += slice) {  // model-loop: input_slices
      const int width = smaller(slice, dim_in - first);
#pragma unroll
      for (int e = 0; e < Tile::kMaxDimIn; ++e) {
        if (e >= first && e < first + width) {
          per_capsule[((e - first) * num_out + t.j) * lanes + t.lane] = term[e];
        }
      }
      __syncthreads();
      for (int e = t.j; e < width; e += num_out) {  // model-loop: min(grad_input_slice, num_out) / num_out
        acc_t total = 0;
        for (int k = 0; k < num_out; ++k) {  // model-loop: num_out
          total += per_capsule[(e * num_out + k) * lanes + t.lane];
        }
        if (t.active) {
          grad_u[first + e] = static_cast<scalar_t>(total);
        }
      }
      __syncthreads();  // reads done before the next round overwrites per_capsule
    }
    grad_u += n.dim_in;
  }
}

// dL/dbias[j, d] = sum_b sum over the gs terms of gs_k[b, j, d] (the bias enters every s_k;
// with detach_routing only s_{r-1}). Grid ceil(J D / 32), block (32 columns, sample
// groups), groups added in order in shared memory.
template <typename scalar_t>
__global__ void __launch_bounds__(kColumnKernelMaxThreads) grad_bias_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const int64_t column = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = column < g.columns();
  const int64_t j = active ? column / n.dim_out : 0;
  const int64_t d = active ? column % n.dim_out : 0;
  acc_t total = 0;
  if (active) {
    for (int64_t b = threadIdx.y; b < n.batch; b += blockDim.y) {  // model-loop: ceil(batch / 8)
      for (int k = 0; k < p.terms_of.grad_s_count(); ++k) {  // model-loop: grad_s_terms
        total += p.terms[g.term_vector(b, k, j) + d];
      }
    }
  }
  acc_t* shared = dynamic_shared_memory<acc_t>();
  shared[threadIdx.y * blockDim.x + threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (int group = 1; group < int(blockDim.y); ++group) {  // model-loop: 7
      total += shared[group * blockDim.x + threadIdx.x];
    }
    p.grad_bias[column] = static_cast<scalar_t>(total);
  }
}

}  // namespace capsnet::cuda
