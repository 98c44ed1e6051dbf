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
// the terms. Grid and block as forward_squash_kernel (CapsuleColumns).
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(kColumnKernelMaxThreads) backward_squash_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kDim = Tile::kMaxDimOut;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const CapsuleColumns c = CapsuleColumns::locate(n);
  const int k = p.iteration;
  const bool last = k + 1 == n.iterations;
  const int64_t vector_elements = int64_t(c.capsules) * n.dim_out;
  acc_t* grad = dynamic_shared_memory<acc_t>();  // [capsules][D]: dL/dv_k
  acc_t* s = grad + vector_elements;             // [capsules][D]: s_k, then s_t
  if (c.has_column) {
    acc_t total = 0;
    if (last) {
      total = static_cast<acc_t>(p.grad_v[g.output_vector(c.b, c.j) + c.d]);
    } else {
      const acc_t* partial = p.partials + g.partial_vector(c.b, 0, c.j) + c.d;
      const int64_t chunk_stride = g.columns();
#pragma unroll 4
      for (int64_t chunk = 0; chunk < g.part.num_chunks; ++chunk) {  // model-loop: num_chunks; unroll 4
        total += *partial;
        partial += chunk_stride;
      }
    }
    grad[c.local] = total;
  }
  if (last) {
    // V_m = v_0 + ... + v_{m-1}, component by component as forward_squash_kernel did.
    acc_t V = 0;
    for (int t = 0; t + 1 < n.iterations; ++t) {  // model-loop: iterations - 1
      if (c.has_column) {
        s[c.local] = p.s_saved[g.iteration_vector(c.b, t, c.j) + c.d];
      }
      __syncthreads();
      if (c.has_column) {
        const auto component = c.capsule_of(s, n.dim_out);
        if (!p.options.detach_routing) {
          const SquashCoefficients<acc_t> coefficients = squash_coefficients<kDim, acc_t>(component, n.dim_out);
          acc_t* v = p.terms + g.term_vector(c.b, p.terms_of.squashed_term(t), c.j);
          squash_forward<kDim>(coefficients, component, n.dim_out, [&](auto d, acc_t value) {
            if (d == c.d) {
              v[d] = value;
            }
          });
        }
        V = add_squashed<kDim>(component, n.dim_out, c.d, V);
        p.agreement[g.iteration_vector(c.b, t + 1, c.j) + c.d] = V;
      }
      __syncthreads();  // s is read before the next t overwrites it
    }
  }
  if (c.has_column) {
    s[c.local] = p.s_saved[g.iteration_vector(c.b, k, c.j) + c.d];
  }
  __syncthreads();
  if (!c.has_column) {
    return;
  }
  const auto component = c.capsule_of(s, n.dim_out);
  const auto grad_v = c.capsule_of(grad, n.dim_out);
  const SquashCoefficients<acc_t> coefficients = squash_coefficients<kDim, acc_t>(component, n.dim_out);
  acc_t* grad_s = p.terms + g.term_vector(c.b, p.terms_of.grad_s_term(k), c.j);
  squash_backward<kDim>(coefficients, component, grad_v, n.dim_out, [&](auto d, acc_t value) {
    if (d == c.d) {
      grad_s[d] = value;
    }
  });
}

// Sweep pass m. Per input capsule i of the chunk and thread (sample, j), with u_hat and
// c_m recomputed:
//   full, m >= 1: stores c_m and G_m, and partials[b, chunk, j, :] = sum_i G_m u_hat[j|i]
//                 (part of dL/dv_{m-1});
//   full, m = 0 (a logit prior only): stores G_0, whose batch sum is grad_prior;
//   detach_routing (m = r-1): stores c_{r-1}.
// Grid and block as forward_partial_sums_kernel; one instantiation per kind of pass.
template <typename scalar_t, typename Tile, SweepPass kPass>
__global__ void __launch_bounds__(Tile::kMaxThreads, Tile::kMinBlocks) backward_partial_sums_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const RoutingThread t = RoutingThread::locate(g);
  const int m = p.iteration;
  const BackwardTerms& terms = p.terms_of;
  constexpr bool kDetach = kPass == SweepPass::kCouplingsOnly;
  const CapsuleExchange<acc_t, Tile> exchange{dynamic_shared_memory<acc_t>(), g.part.samples_per_block, int(n.num_out)};
  exchange.prepare(t.lane, t.j);

  constexpr bool kExact = Tile::kExactDimOut;
  const int dim_out = int(n.dim_out), dim_in = int(n.dim_in);

  acc_t agreement[Tile::kMaxDimOut];  // V_m
  fill(agreement, acc_t(0));
  if (t.active && kPass != SweepPass::kPriorGrads) {
    load_vector<kExact>(p.agreement + g.iteration_vector(t.b, m, t.j), dim_out, agreement);
  }
  // gs_m: in registers, or, in the CapsNet tile, in this thread's row of shared memory
  // after the exchange (read back with 16-byte loads when needed), which leaves the
  // registers to the predictions: no spills at two blocks per SM.
  const ThreadRow<acc_t, Tile> grad_s_row{
      dynamic_shared_memory<acc_t>() + exchange_elements<Tile>(n.num_out, g.part.samples_per_block, int(sizeof(acc_t))),
      t.j * g.part.samples_per_block + t.lane};
  acc_t grad_s[ThreadRow<acc_t, Tile>::kInRegisters ? Tile::kMaxDimOut : 1];
  {
    acc_t values[Tile::kMaxDimOut];
    fill(values, acc_t(0));
    if (t.active && !kDetach) {
      load_vector<kExact>(p.terms + g.term_vector(t.b, terms.grad_s_term(m), t.j), dim_out, values);
    }
    grad_s_row.keep(values, grad_s);
  }
  const bool has_later_logits = !kDetach && m + 1 < n.iterations;  // else G_{m+1} = 0
  constexpr bool kSumsGradV = kPass == SweepPass::kLogitGrads;

  // 32-bit offsets walked along the chunk, as in forward_partial_sums_kernel. Lanes past
  // the batch read the last sample's rows and store nothing.
  const int b = t.active ? t.b : int(n.batch) - 1;
  int u_offset = int(g.input_row(b, t.i_begin));
  int W_offset = int(g.weight_matrix(t.i_begin, t.j));
  const int W_step = int(n.num_out * n.dim_out * n.dim_in);
  int pair = int(g.pair(t.i_begin, t.j));  // of logit_prior and prior_couplings
  const int num_out = int(n.num_out);
  const acc_t uniform = uniform_coupling<acc_t>(n.num_out, p.options);
  // This thread's coefficients of input i_begin; each slot that this pass reads or writes
  // is a fixed distance away, and one input capsule further is coefficient_step.
  int coefficient = int(g.coefficient(0, t.i_begin, t.j, b));
  const int slot_stride = int(n.num_in * n.num_out * n.batch);
  const int coefficient_step = int(n.num_out * n.batch);
  const int coupling_slot = (kSumsGradV || kDetach) ? terms.coupling_slot(m) * slot_stride : 0;
  const int logit_grad_slot = !kDetach ? terms.logit_grad_slot(m) * slot_stride : 0;
  const int later_logit_grad_slot = has_later_logits ? terms.logit_grad_slot(m + 1) * slot_stride : 0;

  acc_t grad_v_partial[Tile::kMaxDimOut];
  fill(grad_v_partial, acc_t(0));
  for (int i = t.i_begin; i < t.i_end; ++i) {  // model-loop: inputs_per_chunk
    acc_t u_i[Tile::kMaxDimIn];
    load_row<Tile>(p.u + u_offset, dim_in, u_i);
    acc_t u_hat[Tile::kMaxDimOut];
    predict<Tile>(p.W + W_offset, u_i, dim_out, dim_in, u_hat);
    u_offset += dim_in;
    W_offset += W_step;
    acc_t c;
    if constexpr (kPass == SweepPass::kPriorGrads) {
      c = p.prior_couplings != nullptr ? p.prior_couplings[pair] : uniform;
    } else {
      const acc_t prior_ij = p.logit_prior != nullptr ? static_cast<acc_t>(p.logit_prior[pair]) : acc_t(0);
      c = exchange_coupling(exchange, t.lane, t.j, routing_logit<kExact>(u_hat, agreement, dim_out, prior_ij), p.options);
    }
    pair += num_out;
    if constexpr (kDetach) {
      if (t.active) {
        p.coefficients[coefficient + coupling_slot] = c;
      }
      coefficient += coefficient_step;
      continue;
    }
    const acc_t grad_c = grad_s_row.dot(grad_s, u_hat, dim_out);
    // The G_0 pass has no other exchange between two inputs' dot exchanges: it alternates
    // two buffers (both with zeros past J), so a buffer is rewritten only after a barrier
    // that every thread reaches after reading it.
    const acc_t row_dot = (kPass == SweepPass::kPriorGrads && ((i - t.i_begin) & 1))
        ? exchange.template reduce<kSumExchange>(t.lane, t.j, c * grad_c, acc_t(0))
        : exchange.template reduce<kDotExchange>(t.lane, t.j, c * grad_c, acc_t(0));
    acc_t logit_grad = coupling_logit_grad(c, grad_c, row_dot);
    if (has_later_logits) {
      logit_grad += p.coefficients[coefficient + later_logit_grad_slot];  // a lane past the batch: sample B-1's
    }
    if (t.active) {
      if constexpr (kSumsGradV) {
        p.coefficients[coefficient + coupling_slot] = c;
      }
      p.coefficients[coefficient + logit_grad_slot] = logit_grad;
    }
    coefficient += coefficient_step;
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
// term by term in order. coefficients[coefficient] is the first stored coefficient of
// (i, j, b) (slot 0), the next slots follow slot_stride apart; vectors[vector] is
// (b, term 0, j, row), the next terms term_stride apart; `initial` is c_0[i, j], term 0's
// coefficient unless it is stored. 32-bit offsets: the planner keeps every workspace below
// 2^31 elements (unsupported_shape_reason).
template <bool kExact, int kRows, typename acc_t>
__device__ __forceinline__ void grad_prediction(
    const BackwardTerms& terms, int count, const acc_t* __restrict__ coefficients, int coefficient, int slot_stride,
    acc_t initial, const acc_t* __restrict__ vectors, int vector, int term_stride, int rows, acc_t (&x)[kRows]) {
  fill(x, acc_t(0));
  acc_t scale = initial;
  if (terms.stored_coefficient(0)) {
    scale = coefficients[coefficient];
    coefficient += slot_stride;
  }
#pragma unroll 1
  for (int term = 0; term < count; ++term) {  // model-loop: terms
    acc_t values[kRows];
    load_vector<kExact>(vectors + vector, rows, values);
#pragma unroll
    for (int d = 0; d < kRows; ++d) {
      x[d] = fused_multiply_add(scale, values[d], x[d]);
    }
    if (term + 1 < count) {
      scale = coefficients[coefficient];
      coefficient += slot_stride;
      vector += term_stride;
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
    // 32-bit offsets walked over this group's samples.
    const int slot_stride = int(n.num_in * n.num_out * n.batch);
    int coefficient = int(g.coefficient(0, i, j, group));
    int vector = int(g.term_vector(group, 0, j) + row);
    int u_row = int(g.input_row(group, i));
    const int vectors_step = int(groups * g.part.terms * g.columns());
    const int u_step = int(groups * n.num_in * n.dim_in);
    const acc_t initial = initial_coupling(p.prior_couplings, g, i, j, p.options);
    const int prior_slot = terms.logit_grad_slot(0) * slot_stride;
    const int count = g.part.terms;
    const int term_stride = int(g.columns());
    for (int64_t b = group; b < n.batch; b += groups) {  // model-loop: ceil(batch / sample_groups)
      acc_t x[kRows];
      grad_prediction<kExact>(terms, count, p.coefficients, coefficient, slot_stride, initial, p.terms, vector, term_stride, rows, x);
      acc_t u_i[kDimIn];
      load_row<Tile>(p.u + u_row, n.dim_in, u_i);
#pragma unroll
      for (int d = 0; d < kRows; ++d) {
#pragma unroll
        for (int e = 0; e < kDimIn; ++e) {
          grad_w[d][e] = fused_multiply_add(x[d], u_i[e], grad_w[d][e]);
        }
      }
      if (sums_prior) {
        grad_prior += p.coefficients[coefficient + prior_slot];
      }
      coefficient += groups;
      vector += vectors_step;
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
#pragma unroll 1
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
__global__ void __launch_bounds__(Tile::kMaxThreads, Tile::kMinBlocks) grad_input_kernel(const BackwardParams<scalar_t> p) {
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
  const int b = t.active ? t.b : int(n.batch) - 1;
  const int slot_stride = int(n.num_in * n.num_out * n.batch);
  const int coefficient_step = int(n.num_out * n.batch);
  int coefficient = int(g.coefficient(0, t.i_begin, t.j, b));
  const int vector = int(g.term_vector(b, 0, t.j));
  const scalar_t* W_ij = p.W + g.weight_matrix(t.i_begin, t.j);
  const int64_t W_step = n.num_out * n.dim_out * n.dim_in;
  const int row_stride = Tile::kExactDimIn ? Tile::kMaxDimIn : dim_in;
  scalar_t* grad_u = p.grad_u + g.input_row(b, t.i_begin);

  const int count = g.part.terms;
  const int term_stride = int(g.columns());
  const acc_t uniform = uniform_coupling<acc_t>(n.num_out, p.options);
  const acc_t* initial = p.prior_couplings != nullptr ? p.prior_couplings + g.pair(t.i_begin, t.j) : nullptr;
  for (int64_t i = t.i_begin; i < t.i_end; ++i) {  // model-loop: inputs_per_chunk
    acc_t x[Tile::kMaxDimOut];
    grad_prediction<kExact>(
        p.terms_of, count, p.coefficients, coefficient, slot_stride, initial != nullptr ? *initial : uniform, p.terms,
        vector, term_stride, dim_out, x);
    initial = initial != nullptr ? initial + n.num_out : nullptr;
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
    coefficient += coefficient_step;
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
#pragma unroll 1
      for (int e = t.j; e < width; e += num_out) {  // model-loop: min(grad_input_slice, num_out) / num_out
        acc_t total = 0;
#pragma unroll 1
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
#pragma unroll 1
    for (int group = 1; group < int(blockDim.y); ++group) {  // model-loop: 7
      total += shared[group * blockDim.x + threadIdx.x];
    }
    p.grad_bias[column] = static_cast<scalar_t>(total);
  }
}

}  // namespace capsnet::cuda
