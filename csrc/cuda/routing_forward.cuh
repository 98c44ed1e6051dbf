// The forward kernels of the fused dynamic routing, and the couplings of a logit prior
// (used by the forward and the backward). docs/CUDA.md explains the design.
//
// Per sample, with iterations k = 0..r-1 (Sabour, Frosst & Hinton 2017):
//   u_hat[j|i] = W[i, j] u[i]                                            (Eq. 2)
//   c_k[i, :]  = coupling step of b_k[i, :],  b_0 = prior (or 0)          (Eq. 3)
//   s_k[j]     = sum_i c_k[i, j] u_hat[j|i] (+ bias[j])                   (Eq. 2)
//   v_k[j]     = squash(s_k[j])                                           (Eq. 1)
//   b_{k+1}[i, j] = b_k[i, j] + <u_hat[j|i], v_k[j]>
// so b_k[i, j] = prior[i, j] + <u_hat[j|i], V_k[j]> with V_k = v_0 + ... + v_{k-1}: the logits
// need no storage, only the running sum V_k ([B, J, D] per iteration). u_hat is never
// stored. The forward saves s_k (s_saved) and nothing else; the backward recomputes the
// couplings. One launch per iteration: the chunks' partial sums meet in the chunk tree
// (routing_tree.cuh), whose last block squashes.
#pragma once

#include "routing_staging.cuh"
#include "routing_tree.cuh"

namespace capsnet::cuda {

template <typename scalar_t>
struct ForwardParams {
  using acc_t = opmath_t<scalar_t>;
  RoutingGeometry geometry;
  RoutingOptions options;
  const scalar_t* u;             // [B, I, E]
  const scalar_t* W;             // [I, J, D, E]
  const scalar_t* bias;          // [J, D] or nullptr
  const acc_t* prior_couplings;  // [I, J]: c_0 from the logit prior, or nullptr (no prior)
  const scalar_t* logit_prior;   // [I, J] or nullptr
  scalar_t* v;                   // [B, J, D]               output
  acc_t* s_saved;                // [B, r, J, D]            output: s_k before squash
  scalar_t* couplings;           // [B, I, J]               output (last iteration), or nullptr
  acc_t* partials;               // [B, num_chunks, J, D]   workspace: partial sums of s_k
  int* tree_counters;            // [sample tiles, chunks]  workspace: zero before the first launch
  acc_t* agreement;              // [r - 1, B, J, D]        workspace: V_k
  int iteration;                 // k
};

template <typename scalar_t>
struct PriorParams {
  using acc_t = opmath_t<scalar_t>;
  RoutingGeometry geometry;
  RoutingOptions options;
  const scalar_t* logit_prior;  // [I, J]
  acc_t* prior_couplings;       // [I, J] output
};

// c_0[i, :] = coupling step of prior[i, :] (Eq. 3 at iteration 0): one row per thread, the
// seam's coupling_row. The same for every sample, so computed once per call.
template <typename scalar_t>
__global__ void __launch_bounds__(kColumnKernelMaxThreads) prior_coupling_kernel(const PriorParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const RoutingGeometry& g = p.geometry;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= g.shape.num_in) {
    return;
  }
  acc_t* row = p.prior_couplings + g.pair(i, 0);
  for (int64_t k = 0; k < g.shape.num_out; ++k) {  // model-loop: num_out
    row[k] = static_cast<acc_t>(p.logit_prior[g.pair(i, k)]);
  }
  coupling_row(row, row, g.shape.num_out, 1, p.options, [](acc_t x) { return std::exp(x); });
}

// Which iteration a forward launch computes: its couplings, and what it does with s_k.
enum class ForwardStep {
  kUniformFirst,  // k = 0 without a prior: c_0 = 1/J (or 1/(J+1)) for every (i, j)
  kPriorFirst,    // k = 0 with a prior: c_0 = the prior's couplings
  kLater,         // k >= 1: c_k from the logits (exchange)
  kLaterLeaky,    // the same with leaky routing
};

// Iteration k. Block (sample tile, chunk), thread (lane, j) with kSamples samples:
//   partial[s] = sum_{i in chunk} c_k[i, j] u_hat[s][j|i]     (Eq. 2, part of the sum over i)
// (without a prior at k = 0, c_0 = 1/J times the sum of u_hat: the sum runs straight through
// the prediction's multiply-adds). At the last iteration, when asked, couplings[b, i, j] =
// c_k[i, j]. Then the chunk tree adds the partials up, and its last block per sample tile
//   s_k = sum + bias -> s_saved[b, k];  V_{k+1} = V_k + squash(s_k), or v = squash(s_k) (Eq. 1).
// kStagingSlots > 0 (CapsNet tile, float32): W and u come through an InputRing of that many
// slots in shared memory instead of straight from global memory, with the same results.
template <typename scalar_t, typename Tile, ForwardStep kStep, int kStagingSlots = 0>
__global__ void __launch_bounds__(Tile::kMaxThreads, Tile::kMinBlocks) forward_iteration_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  using Rows = ThreadRows<acc_t, Tile>;
  constexpr int kSamples = Rows::kSamples;
  constexpr int kDim = Tile::kMaxDimOut;
  constexpr bool kExact = Tile::kExactDimOut;
  constexpr bool kLogits = kStep == ForwardStep::kLater || kStep == ForwardStep::kLaterLeaky;
  constexpr bool kStaged = kStagingSlots > 0;
  static_assert(!kStaged || std::is_same_v<scalar_t, float>, "the input ring holds float32 rows");
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const RoutingThread<Tile, kSamples> t = RoutingThread<Tile, kSamples>::locate(g);
  const CapsuleExchange<acc_t, Tile> exchange{dynamic_shared_memory<acc_t>(), g.part.lanes, int(n.num_out)};
  if constexpr (kLogits) {
    exchange.prepare(t.lane, t.j);
  }
  const int k = p.iteration;
  scalar_t* const couplings = k + 1 == n.iterations ? p.couplings : nullptr;
  const int dim_out = kExact ? kDim : int(n.dim_out);
  const int dim_in = Tile::kExactDimIn ? Tile::kMaxDimIn : int(n.dim_in);

  // V_k (zero at k = 0): in registers or in this thread's rows of shared memory.
  const Rows agreement_rows{
      dynamic_shared_memory<acc_t>() + exchange_elements<Tile>(n.num_out, g.part.lanes, int(sizeof(acc_t))), 0, t.flat(),
      int(blockDim.x * blockDim.y)};
  acc_t agreement[kSamples][Rows::kKept];
  {
    acc_t values[kSamples][kDim];
    fill(values, acc_t(0));
    if constexpr (kLogits) {
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        load_vector<kExact>(p.agreement + g.agreement_vector(k, t.read_b[s], t.j), dim_out, values[s]);
      }
    }
    agreement_rows.keep(values, agreement);
  }

  // Walk the chunk with 32-bit offsets (the planner keeps every tensor below 2^31
  // elements): one add per input instead of recomputed 64-bit indices, and few registers.
  int u_offset[kSamples], coupling[kSamples];
#pragma unroll
  for (int s = 0; s < kSamples; ++s) {
    u_offset[s] = int(g.input_row(t.read_b[s], t.i_begin));
    coupling[s] = int(g.coupling(t.read_b[s], t.i_begin, t.j));
  }
  int W_offset = int(g.weight_matrix(t.i_begin, t.j));
  const int W_step = int(n.num_out) * dim_out * dim_in;  // compile-time D, E in the CapsNet tile
  int pair = int(g.pair(t.i_begin, t.j));  // of logit_prior and prior_couplings
  const int num_out = int(n.num_out);

  acc_t sums[kSamples][kDim];
  fill(sums, acc_t(0));
  using Ring = std::conditional_t<kStaged, InputRing<Tile, kStagingSlots>, DirectInputs>;
  [[maybe_unused]] Ring ring{};
  if constexpr (kStaged) {
    ring = Ring::locate(g, t, 1);
    ring.start(p.W, p.u, t.inputs);
  }
  for (int left = t.inputs; left > 0; --left) {  // model-loop: inputs_per_chunk
    const scalar_t* u_rows[kSamples];
    const scalar_t* W_ij = input_rows(ring, p.W, p.u, W_offset, u_offset, t.inputs - left, t, u_rows);
    acc_t u_i[kSamples][Tile::kMaxDimIn];
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      load_row<Tile>(u_rows[s], dim_in, u_i[s]);
      u_offset[s] += dim_in;
    }
    if constexpr (kStep == ForwardStep::kUniformFirst) {
      // Every c_0 is the same: sum u_hat, scaled once at the end.
      add_prediction<Tile>(W_ij, u_i, dim_out, dim_in, sums);
    } else {
      acc_t u_hat[kSamples][kDim];
      predict<Tile>(W_ij, u_i, dim_out, dim_in, u_hat);
      acc_t c[kSamples];
      if constexpr (kStep == ForwardStep::kPriorFirst) {
        fill(c, p.prior_couplings[pair]);
      } else {
        const acc_t prior_ij = p.logit_prior != nullptr ? static_cast<acc_t>(p.logit_prior[pair]) : acc_t(0);
        acc_t logits[kSamples];
#pragma unroll
        for (int s = 0; s < kSamples; ++s) {
          logits[s] = routing_logit(u_hat[s], agreement_rows, agreement, s, dim_out, prior_ij);
        }
        exchange_couplings<kStep == ForwardStep::kLaterLeaky>(exchange, t.lane, t.j, logits, c);
      }
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
#pragma unroll
        for (int d = 0; d < kDim; ++d) {
          sums[s][d] = fused_multiply_add(c[s], u_hat[s][d], sums[s][d]);
        }
        if (couplings != nullptr && t.active[s]) {
          couplings[coupling[s]] = static_cast<scalar_t>(c[s]);
        }
        coupling[s] += num_out;
      }
    }
    W_offset += W_step;
    pair += num_out;
  }
  if (kStep == ForwardStep::kUniformFirst && couplings != nullptr) {  // r = 1: the couplings are 1/J
    // model-fraction-begin: 1 if iterations == 1 else 0
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      if (t.active[s]) {
#pragma unroll 1
        for (int i = 0; i < t.inputs; ++i) {  // model-loop: inputs_per_chunk
          couplings[coupling[s] + i * num_out] = static_cast<scalar_t>(uniform_coupling<acc_t>(n.num_out, p.options));
        }
      }
    }
    // model-fraction-end
  }

  // The tail works from the thread's place located again: cheaper to recompute than to
  // keep in registers across the loop.
  const RoutingThread<Tile, kSamples> here = RoutingThread<Tile, kSamples>::locate(g);
  const ChunkTree<acc_t, Tile> tree{p.partials, p.tree_counters};
  if (!tree.add_up(g, here, sums)) {
    return;
  }
  // One block of the tile's chunks gets here.
  // model-fraction-begin: 1 / num_chunks
  // This block holds s_k (before the bias) of its sample tile.
  acc_t bias[kDim];
  fill(bias, acc_t(0));
  if (p.bias != nullptr) {
    load_output_row<Tile>(p.bias + here.j * dim_out, dim_out, bias);
  }
  const acc_t uniform = uniform_coupling<acc_t>(n.num_out, p.options);
  const Rows rows{
      dynamic_shared_memory<acc_t>() + exchange_elements<Tile>(n.num_out, g.part.lanes, int(sizeof(acc_t))), 0, here.flat(),
      int(blockDim.x * blockDim.y)};
#pragma unroll
  for (int s = 0; s < kSamples; ++s) {
    if (!here.active[s]) {
      continue;
    }
#pragma unroll
    for (int d = 0; d < kDim; ++d) {
      sums[s][d] = (kStep == ForwardStep::kUniformFirst ? uniform * sums[s][d] : sums[s][d]) + bias[d];
    }
    store_vector<kExact>(sums[s], dim_out, p.s_saved + g.iteration_vector(here.b[s], k, here.j));
    if (k + 1 < n.iterations) {
      acc_t V[kDim], v[kDim];
      rows.load(agreement, s, V);
      squash_capsule(sums[s], dim_out, v);
      add_squashed(v, V);  // V_k becomes V_{k+1}
      store_vector<kExact>(V, dim_out, p.agreement + g.agreement_vector(k + 1, here.b[s], here.j));
    } else {
      acc_t v[kDim];
      squash_capsule(sums[s], dim_out, v);
      store_output_row<Tile>(v, dim_out, p.v + g.output_vector(here.b[s], here.j));
    }
  }
  // model-fraction-end
}

}  // namespace capsnet::cuda
