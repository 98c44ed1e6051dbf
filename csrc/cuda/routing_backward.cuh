// The backward sweep of the fused dynamic routing: per-sample state, couplings and logit
// gradients. docs/CUDA.md explains the design; the gradient kernels that use what the
// sweep stores are in routing_gradients.cuh.
//
// The forward saved only s_k; u_hat and the couplings are recomputed here, by the same
// device functions as in the forward (predict, routing_logit, exchange_couplings,
// add_squashed), so the couplings are bitwise those of the forward.
//
// Reverse sweep, G_r = 0, for m = r-1 .. 1 (and m = 0 with a logit prior, for grad_prior):
//   dL/dv_m = (m == r-1) ? grad_v : sum_i G_{m+1}[i, j] u_hat[j|i]    (b_{m+1} = b_m + <u_hat, v_m>)
//   gs_m    = squash backward of dL/dv_m at s_m                        (Eq. 1)
//   gc_m    = <gs_m[j], u_hat[j|i]>,  G_m = G_{m+1} + c_m (gc_m - <c_m, gc_m>)   (Eq. 3 backward)
// then dL/du_hat[j|i] = sum_k c_k gs_k + sum_{m>=1} G_m v_{m-1} (BackwardTerms, routing_layout.h),
//   dL/dW[i] = sum_b dL/du_hat[b, i] (outer) u[b, i],  dL/du[b, i] = sum_j W[i, j]^T dL/du_hat[b, i, j],
//   dL/dbias = sum_b sum_k gs_k[b],  dL/dprior = sum_b G_0[b].
// detach_routing: the couplings are constants, dL/du_hat = c_{r-1} gs_{r-1}: one pass that
// recomputes c_{r-1}, and the gradient kernels on one term.
//
// One launch per sweep pass m: its chunk tree (routing_tree.cuh) adds up dL/dv_{m-1}, and
// the tree's last block per sample tile turns it into gs_{m-1}. The first pass (m = r-1)
// recomputes the per-sample state (V_m, v_m, gs_{r-1}) in its prologue.
#pragma once

#include "routing_forward.cuh"
#include "routing_staging.cuh"

namespace capsnet::cuda {

// What a sweep pass computes (backward_sweep_kernel).
enum class SweepPass {
  kFirstLogitGrads,  // m = r-1 >= 1: the per-sample state, then as kLogitGrads
  kLogitGrads,       // 1 <= m < r-1: c_m, G_m and dL/dv_{m-1} -> gs_{m-1}
  kPriorGrads,       // m = 0 with a logit prior: G_0 (c_0 is the prior's, no exchange)
  kCouplingsOnly,    // detach_routing, m = r-1 >= 1: the per-sample state, c_{r-1}
};

template <typename scalar_t>
struct BackwardParams {
  using acc_t = opmath_t<scalar_t>;
  RoutingGeometry geometry;
  RoutingOptions options;
  BackwardTerms terms_of;
  GradientStrides strides;       // gradient_strides(geometry, terms_of)
  const scalar_t* grad_v;        // [B, J, D]
  const scalar_t* u;             // [B, I, E]
  const scalar_t* W;             // [I, J, D, E]
  const scalar_t* logit_prior;   // [I, J] or nullptr
  const acc_t* prior_couplings;  // [I, J]: c_0 from the prior, or nullptr
  const acc_t* s_saved;          // [B, r, J, D]
  acc_t* agreement;              // [r - 1, B, J, D]      workspace: V_m (m = 1..r-2: stored by the first pass)
  acc_t* terms;                  // [B, terms, J, D]      workspace: gs_k and v_k
  acc_t* coefficients;           // [slots, I, J, B']     workspace: c_m and G_m
  acc_t* partials;               // [B, chunks, J, D]     workspace: partial sums of dL/dv_{m-1}
  int* tree_counters;            // [sample tiles, chunks] workspace: zero before the first pass
  // Outputs. With `sums` (a batch processed in slices, routing_host.h), dW, dbias and
  // dprior go to the op-math sums instead, added to what earlier slices left there unless
  // `first_slice`.
  scalar_t* grad_u;              // [B, I, E]
  scalar_t* grad_W;              // [I, J, D, E]
  scalar_t* grad_bias;           // [J, D]
  scalar_t* grad_prior;          // [I, J], or nullptr (no prior gradient)
  acc_t* grad_W_sum;             // [I, J, D, E] or nullptr
  acc_t* grad_bias_sum;          // [J, D] or nullptr
  acc_t* grad_prior_sum;         // [I, J] or nullptr
  bool first_slice;
  int iteration;                 // m
};

// The per-sample state a thread needs at the start of the backward, for its samples and
// output capsule j (full capsules in registers): V_{r-1}, and in `agreement` V_m = v_0 +
// ... + v_{m-1} as the forward computed it; gs_{r-1} = squash backward of grad_v at s_{r-1}.
// With `store` (one block per sample tile), also the terms' vectors gs_{r-1} and v_t
// (t < r - 1) and V_m (1 <= m < r - 1, for the later passes).
template <typename Tile, typename scalar_t, typename acc_t, int kSamples>
__device__ __forceinline__ void recompute_state(
    const BackwardParams<scalar_t>& p, const RoutingThread<Tile, kSamples>& t, bool store,
    acc_t (&V)[kSamples][Tile::kMaxDimOut], acc_t (&grad_s)[kSamples][Tile::kMaxDimOut]) {
  constexpr int kDim = Tile::kMaxDimOut;
  constexpr bool kExact = Tile::kExactDimOut;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const int dim = kExact ? kDim : int(n.dim_out);
  const BackwardTerms& terms = p.terms_of;
  const int last = int(n.iterations) - 1;
  // 32-bit offsets, stepped (routing_launch.h keeps s_saved, the term vectors and the
  // agreement below 2^31 elements): fewer integer instructions than the 64-bit index
  // arithmetic per vector.
  const int columns = int(g.columns());
  const int agreement_step = int(n.batch) * columns;  // from V_k to V_{k+1}
#pragma unroll
  for (int s = 0; s < kSamples; ++s) {
    const bool stores = store && t.active[s];
    fill(V[s], acc_t(0));
    acc_t s_t[kDim];
    int saved = int(g.iteration_vector(t.read_b[s], 0, t.j));
    // Used only where the sample is in the batch.
    int squashed = stores ? int(g.term_vector(t.b[s], terms.squashed_term(0), t.j)) : 0;
    int agreement = stores && last > 1 ? int(g.agreement_vector(1, t.b[s], t.j)) : 0;
    for (int step = 0; step < last; ++step) {  // model-loop: iterations - 1
      load_vector<kExact>(p.s_saved + saved, dim, s_t);
      saved += columns;
      acc_t v[kDim];
      squash_capsule(s_t, dim, v);
      if (!p.options.detach_routing && stores) {
        store_vector<kExact>(v, dim, p.terms + squashed);
      }
      squashed += columns;
      add_squashed(v, V[s]);
      if (!p.options.detach_routing && stores && step + 1 < last) {
        store_vector<kExact>(V[s], dim, p.agreement + agreement);
      }
      agreement += agreement_step;
    }
    load_vector<kExact>(p.s_saved + saved, dim, s_t);
    acc_t grad_v[kDim];
    fill(grad_v, acc_t(0));
    const scalar_t* grad_v_row = p.grad_v + g.output_vector(t.read_b[s], t.j);
#pragma unroll
    for (int d = 0; d < kDim; ++d) {
      if (kExact || d < dim) {
        grad_v[d] = static_cast<acc_t>(grad_v_row[d]);
      }
    }
    squash_capsule_backward(s_t, grad_v, dim, grad_s[s]);
    if (stores) {
      store_vector<kExact>(grad_s[s], dim, p.terms + g.term_vector(t.b[s], terms.grad_s_term(last), t.j));
    }
  }
}

// Sweep pass m. Per input capsule i of the chunk and thread (lane, j) with kSamples samples,
// u_hat and c_m recomputed:
//   kFirstLogitGrads, kLogitGrads: stores c_m and G_m; partial[s] = sum_i G_m u_hat[j|i]
//       (part of dL/dv_{m-1}), added up by the chunk tree, whose last block per sample tile
//       stores gs_{m-1} = squash backward of dL/dv_{m-1} at s_{m-1};
//   kPriorGrads (m = 0, a logit prior only): stores G_0, whose batch sum is grad_prior;
//   kCouplingsOnly (detach_routing, m = r-1): stores c_{r-1}.
// Grid and block as forward_iteration_kernel; kLeaky: options.leaky at compile time.
// kStagingSlots > 0 (CapsNet tile, float32): W and u through an InputRing after the thread
// rows, as the forward's, with the same results.
template <typename scalar_t, typename Tile, SweepPass kPass, bool kLeaky, int kStagingSlots = 0>
__global__ void __launch_bounds__(Tile::kMaxThreads, Tile::kMinBlocks) backward_sweep_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  using Rows = ThreadRows<acc_t, Tile>;
  constexpr int kSamples = Rows::kSamples;
  constexpr int kDim = Tile::kMaxDimOut;
  constexpr bool kExact = Tile::kExactDimOut;
  constexpr bool kFirst = kPass == SweepPass::kFirstLogitGrads || kPass == SweepPass::kCouplingsOnly;
  constexpr bool kSumsGradV = kPass == SweepPass::kFirstLogitGrads || kPass == SweepPass::kLogitGrads;
  constexpr bool kDetach = kPass == SweepPass::kCouplingsOnly;
  constexpr bool kStaged = kStagingSlots > 0;
  static_assert(!kStaged || std::is_same_v<scalar_t, float>, "the input ring holds float32 rows");
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const RoutingThread<Tile, kSamples> t = RoutingThread<Tile, kSamples>::locate(g);
  const int m = p.iteration;
  const BackwardTerms& terms = p.terms_of;
  const CapsuleExchange<acc_t, Tile> exchange{dynamic_shared_memory<acc_t>(), g.part.lanes, int(n.num_out)};
  exchange.prepare(t.lane, t.j);
  const int dim_out = kExact ? kDim : int(n.dim_out);
  const int dim_in = Tile::kExactDimIn ? Tile::kMaxDimIn : int(n.dim_in);

  // V_m and gs_m: recomputed by the first pass (whose chunk-0 blocks store them for the
  // later passes and the gradient kernels), loaded by the later ones; then kept in
  // registers or, in the CapsNet tile, in this thread's rows of shared memory after the
  // exchange (read back with 16-byte loads when needed), which leaves the registers to the
  // predictions: no spills at two blocks per SM.
  acc_t* const rows = dynamic_shared_memory<acc_t>() + exchange_elements<Tile>(n.num_out, g.part.lanes, int(sizeof(acc_t)));
  const int threads = int(blockDim.x * blockDim.y);
  const Rows agreement_rows{rows, 0, t.flat(), threads};
  const Rows grad_s_rows{rows, 1, t.flat(), threads};
  acc_t agreement[kSamples][Rows::kKept];
  acc_t grad_s[kSamples][Rows::kKept];
  {
    acc_t V[kSamples][kDim], gs[kSamples][kDim];
    if constexpr (kFirst) {
      recompute_state<Tile>(p, t, t.chunk == 0, V, gs);
    } else {
      fill(V, acc_t(0));
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        if (kPass != SweepPass::kPriorGrads) {
          load_vector<kExact>(p.agreement + g.agreement_vector(m, t.read_b[s], t.j), dim_out, V[s]);
        }
        load_vector<kExact>(p.terms + g.term_vector(t.read_b[s], terms.grad_s_term(m), t.j), dim_out, gs[s]);
      }
    }
    agreement_rows.keep(V, agreement);
    grad_s_rows.keep(gs, grad_s);
  }
  const bool has_later_logits = !kDetach && m + 1 < n.iterations;  // else G_{m+1} = 0

  // 32-bit offsets walked along the chunk, as in forward_iteration_kernel. Samples past
  // the batch read sample B-1's rows and store nothing.
  int u_offset[kSamples];
#pragma unroll
  for (int s = 0; s < kSamples; ++s) {
    u_offset[s] = int(g.input_row(t.read_b[s], t.i_begin));
  }
  int W_offset = int(g.weight_matrix(t.i_begin, t.j));
  const int W_step = int(n.num_out * n.dim_out * n.dim_in);
  int pair = int(g.pair(t.i_begin, t.j));  // of logit_prior and prior_couplings
  const int num_out = int(n.num_out);
  // This thread's coefficients of input i_begin and sample 0 (add b); each slot that this
  // pass reads or writes is a fixed distance away, and one input capsule further is
  // coefficient_step.
  int coefficient = int(g.coefficient(0, t.i_begin, t.j, 0));
  const int slot_stride = int(n.num_in * n.num_out * g.part.coefficient_batch);
  const int coefficient_step = int(n.num_out * g.part.coefficient_batch);
  const int coupling_slot = (kSumsGradV || kDetach) ? terms.coupling_slot(m) * slot_stride : 0;
  const int logit_grad_slot = !kDetach ? terms.logit_grad_slot(m) * slot_stride : 0;
  const int later_logit_grad_slot = has_later_logits ? terms.logit_grad_slot(m + 1) * slot_stride : 0;

  acc_t grad_v_partial[kSamples][kDim];
  fill(grad_v_partial, acc_t(0));
  using Ring = std::conditional_t<kStaged, InputRing<Tile, kStagingSlots>, DirectInputs>;
  [[maybe_unused]] Ring ring{};
  if constexpr (kStaged) {
    ring = Ring::locate(g, t, 2);
    ring.start(p.W, p.u, t.inputs);
  }
  for (int step = 0; step < t.inputs; ++step) {  // model-loop: inputs_per_chunk
    const scalar_t* u_rows[kSamples];
    const scalar_t* W_ij = input_rows(ring, p.W, p.u, W_offset, u_offset, step, t, u_rows);
    acc_t u_i[kSamples][Tile::kMaxDimIn];
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      load_row<Tile>(u_rows[s], dim_in, u_i[s]);
      u_offset[s] += dim_in;
    }
    acc_t u_hat[kSamples][kDim];
    predict<Tile>(W_ij, u_i, dim_out, dim_in, u_hat);
    W_offset += W_step;
    acc_t c[kSamples];
    if constexpr (kPass == SweepPass::kPriorGrads) {
      fill(c, p.prior_couplings[pair]);
    } else {
      const acc_t prior_ij = p.logit_prior != nullptr ? static_cast<acc_t>(p.logit_prior[pair]) : acc_t(0);
      acc_t logits[kSamples];
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        logits[s] = routing_logit(u_hat[s], agreement_rows, agreement, s, dim_out, prior_ij);
      }
      exchange_couplings<kLeaky>(exchange, t.lane, t.j, logits, c);
    }
    pair += num_out;
    if constexpr (kDetach) {
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        if (t.active[s]) {
          p.coefficients[coefficient + coupling_slot + t.b[s]] = c[s];
        }
      }
      coefficient += coefficient_step;
      continue;
    }
    acc_t grad_c[kSamples], weighted[kSamples], row_dot[kSamples];
    const acc_t zeros[kSamples] = {};
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      grad_c[s] = grad_s_rows.dot(u_hat[s], grad_s, s, dim_out);
      weighted[s] = c[s] * grad_c[s];
    }
    // The G_0 pass has no other exchange between two inputs' dot exchanges: it alternates
    // two buffers (both with zeros past J), so a buffer is rewritten only after a barrier
    // that every thread reaches after reading it.
    if (kPass == SweepPass::kPriorGrads && (step & 1)) {
      exchange.template reduce<kSumExchange>(t.lane, t.j, weighted, zeros, row_dot);
    } else {
      exchange.template reduce<kDotExchange>(t.lane, t.j, weighted, zeros, row_dot);
    }
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      acc_t logit_grad = coupling_logit_grad(c[s], grad_c[s], row_dot[s]);
      if (has_later_logits) {
        logit_grad += p.coefficients[coefficient + later_logit_grad_slot + t.b[s]];  // past the batch: padding
      }
      if (t.active[s]) {
        if constexpr (kSumsGradV) {
          p.coefficients[coefficient + coupling_slot + t.b[s]] = c[s];
        }
        p.coefficients[coefficient + logit_grad_slot + t.b[s]] = logit_grad;
      }
      if constexpr (kSumsGradV) {
#pragma unroll
        for (int d = 0; d < kDim; ++d) {
          grad_v_partial[s][d] = fused_multiply_add(logit_grad, u_hat[s][d], grad_v_partial[s][d]);
        }
      }
    }
    coefficient += coefficient_step;
  }
  if constexpr (kSumsGradV) {
    // The tail works from the thread's place located again: cheaper to recompute than to
    // keep in registers across the loop.
    const RoutingThread<Tile, kSamples> here = RoutingThread<Tile, kSamples>::locate(g);
    const ChunkTree<acc_t, Tile> tree{p.partials, p.tree_counters};
    if (!tree.add_up(g, here, grad_v_partial)) {
      return;
    }
    // One block of the tile's chunks gets here.
    // model-fraction-begin: 1 / num_chunks
    // This block holds dL/dv_{m-1} of its sample tile: gs_{m-1}.
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      if (here.active[s]) {
        acc_t s_prev[kDim], gs[kDim];
        load_vector<kExact>(p.s_saved + g.iteration_vector(here.b[s], m - 1, here.j), dim_out, s_prev);
        squash_capsule_backward(s_prev, grad_v_partial[s], dim_out, gs);
        store_vector<kExact>(gs, dim_out, p.terms + g.term_vector(here.b[s], terms.grad_s_term(m - 1), here.j));
      }
    }
    // model-fraction-end
  }
}

// r = 1 (no sweep): gs_0 = squash backward of grad_v at s_0 into the term vector. Grid and
// block as the routing kernels, no input chunks (grid y = 1).
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(Tile::kMaxThreads) backward_output_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kSamples = samples_per_thread<Tile>(int(sizeof(acc_t)));
  const RoutingThread<Tile, kSamples> t = RoutingThread<Tile, kSamples>::locate(p.geometry);
  acc_t V[kSamples][Tile::kMaxDimOut], grad_s[kSamples][Tile::kMaxDimOut];
  recompute_state<Tile>(p, t, true, V, grad_s);
}

}  // namespace capsnet::cuda
