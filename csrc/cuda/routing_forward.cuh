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
// need no storage, only the running sum V_k ([B, J, D]). u_hat is never stored. The forward
// saves s_k (s_saved) and nothing else; the backward recomputes the couplings.
#pragma once

#include "routing_device.cuh"

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
  acc_t* agreement;              // [B, J, D]               workspace: V_k
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
  for (int64_t k = 0; k < g.shape.num_out; ++k) {
    row[k] = static_cast<acc_t>(p.logit_prior[g.pair(i, k)]);
  }
  coupling_row(row, row, g.shape.num_out, 1, p.options, [](acc_t x) { return std::exp(x); });
}

// partials[b, chunk, j, :] = sum_{i in chunk} c_k[i, j] u_hat[j|i]       (Eq. 2, part of the sum),
// and at the last iteration, when asked, couplings[b, i, j] = c_k[i, j].
// Grid (sample tiles, chunks), block (lanes, J). kFirst: iteration 0, whose couplings are the
// initial ones (no logits, no exchange), compiled separately so that neither pays for the other.
template <typename scalar_t, typename Tile, bool kFirst>
__global__ void __launch_bounds__(Tile::kMaxThreads, Tile::kMinBlocks) forward_partial_sums_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const RoutingThread t = RoutingThread::locate(g);
  const CapsuleExchange<acc_t, Tile> exchange{dynamic_shared_memory<acc_t>(), g.part.samples_per_block, int(n.num_out)};
  if constexpr (!kFirst) {
    exchange.prepare(t.lane, t.j);
  }
  scalar_t* const couplings = p.iteration + 1 == n.iterations ? p.couplings : nullptr;

  constexpr bool kExact = Tile::kExactDimOut;
  const int dim_out = int(n.dim_out), dim_in = int(n.dim_in);

  acc_t agreement[Tile::kMaxDimOut];
  fill(agreement, acc_t(0));
  if (!kFirst && t.active) {
    load_vector<kExact>(p.agreement + g.output_vector(t.b, t.j), dim_out, agreement);
  }

  // Walk the chunk with 32-bit offsets (the planner keeps every tensor below 2^31
  // elements): one add per input instead of recomputed 64-bit indices, and few registers.
  // A lane past the batch reads the last sample's rows (valid memory) and stores nothing.
  const int b = t.active ? t.b : int(n.batch) - 1;
  int u_offset = int(g.input_row(b, t.i_begin));
  int W_offset = int(g.weight_matrix(t.i_begin, t.j));
  const int W_step = int(n.num_out * n.dim_out * n.dim_in);
  int pair = int(g.pair(t.i_begin, t.j));  // of logit_prior and prior_couplings
  int coupling = int(g.coupling(b, t.i_begin, t.j));
  const int num_out = int(n.num_out);
  const bool stores_couplings = couplings != nullptr && t.active;
  const acc_t uniform = uniform_coupling<acc_t>(n.num_out, p.options);

  acc_t s_partial[Tile::kMaxDimOut];
  fill(s_partial, acc_t(0));
  for (int i = t.i_begin; i < t.i_end; ++i) {  // model-loop: inputs_per_chunk
    acc_t u_i[Tile::kMaxDimIn];
    load_row<Tile>(p.u + u_offset, dim_in, u_i);
    acc_t u_hat[Tile::kMaxDimOut];
    predict<Tile>(p.W + W_offset, u_i, dim_out, dim_in, u_hat);
    acc_t c;
    if constexpr (kFirst) {
      c = p.prior_couplings != nullptr ? p.prior_couplings[pair] : uniform;
    } else {
      const acc_t prior_ij = p.logit_prior != nullptr ? static_cast<acc_t>(p.logit_prior[pair]) : acc_t(0);
      c = exchange_coupling(exchange, t.lane, t.j, routing_logit<kExact>(u_hat, agreement, dim_out, prior_ij), p.options);
    }
#pragma unroll
    for (int d = 0; d < Tile::kMaxDimOut; ++d) {
      s_partial[d] = fused_multiply_add(c, u_hat[d], s_partial[d]);
    }
    if (stores_couplings) {
      couplings[coupling] = static_cast<scalar_t>(c);
    }
    u_offset += dim_in;
    W_offset += W_step;
    pair += num_out;
    coupling += num_out;
  }
  if (t.active) {
    store_vector(s_partial, n.dim_out, p.partials + g.partial_vector(t.b, t.chunk, t.j));
  }
}

// s_k[b, j] = (sum of the chunks' partial sums, in chunk order) + bias  -> s_saved[b, k];
// then V_{k+1} = V_k + squash(s_k) for the next iteration, or v = squash(s_k) (Eq. 1) at the
// last. Grid (B, capsule groups), block (capsules x D_out) threads: CapsuleColumns.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(kColumnKernelMaxThreads) forward_squash_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const CapsuleColumns c = CapsuleColumns::locate(n);
  acc_t* s = dynamic_shared_memory<acc_t>();  // [capsules][D]: s_k
  if (c.has_column) {
    const acc_t* partial = p.partials + g.partial_vector(c.b, 0, c.j) + c.d;
    const int64_t chunk_stride = g.columns();
    acc_t total = 0;
#pragma unroll 4
    for (int64_t chunk = 0; chunk < g.part.num_chunks; ++chunk) {  // model-loop: num_chunks; unroll 4
      total += *partial;
      partial += chunk_stride;
    }
    if (p.bias != nullptr) {
      total += static_cast<acc_t>(p.bias[c.j * n.dim_out + c.d]);
    }
    s[c.local] = total;
    p.s_saved[g.iteration_vector(c.b, p.iteration, c.j) + c.d] = total;
  }
  __syncthreads();
  if (!c.has_column) {
    return;
  }
  const auto component = c.capsule_of(s, n.dim_out);
  const int64_t out = g.output_vector(c.b, c.j) + c.d;
  if (p.iteration + 1 < n.iterations) {
    const acc_t V = p.iteration > 0 ? p.agreement[out] : acc_t(0);
    p.agreement[out] = add_squashed<Tile::kMaxDimOut>(component, n.dim_out, c.d, V);
  } else {
    const SquashCoefficients<acc_t> k = squash_coefficients<Tile::kMaxDimOut, acc_t>(component, n.dim_out);
    squash_forward<Tile::kMaxDimOut>(k, component, n.dim_out, [&](auto d, acc_t value) {
      if (d == c.d) {
        p.v[out] = static_cast<scalar_t>(value);
      }
    });
  }
}

}  // namespace capsnet::cuda
