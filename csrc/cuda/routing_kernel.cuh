// The fused dynamic-routing kernels, forward and backward (docs/CUDA.md explains the design).
//
// This header is compiled twice: by nvcc for the GPU (routing_kernel.cu) and by g++ with the
// CPU emulation of CUDA in csrc/simt, which runs these very kernels in the tests. Keep the
// code inside what the emulator supports (csrc/simt/README.md): no inline PTX and no
// implicit warp-synchronous code; threads exchange data only through shared or global
// memory separated by __syncthreads().
//
// Equations: Sabour, Frosst & Hinton (2017). Per sample, with iterations k = 0..r-1:
//   u_hat[j|i] = W[i, j] u[i]                                     (Eq. 2)
//   c_k[i, :]  = softmax_j(b_k[i, :]),  b_0 = 0                    (Eq. 3)
//   s_k[j]     = sum_i c_k[i, j] u_hat[j|i] (+ bias[j])            (Eq. 2)
//   v_k[j]     = squash(s_k[j])                                    (Eq. 1)
//   b_{k+1}[i, j] = b_k[i, j] + <u_hat[j|i], v_k[j]>
// so b_k[i, j] = <u_hat[j|i], V_k[j]> with V_k = v_0 + ... + v_{k-1}: the logits need no
// storage, only the running sum V_k of the outputs (recomputed from s_saved). The forward
// saves s_k (s_saved) and c_k (couplings) of every iteration; u_hat is never stored.
#pragma once

#include <cstdint>

#include "routing_layout.h"
#include "routing_math.h"

namespace capsnet::cuda {

#if defined(__CUDACC__)
// The block's dynamic shared memory, sized at launch. The emulator (csrc/simt/simt.h)
// defines the same function for the CPU.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return reinterpret_cast<T*>(dynamic_shared_bytes);
}
#endif

// ---------------------------------------------------------------------------------------
// Kernel arguments. One struct per direction, passed by value; each kernel reads its part.
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
struct ForwardParams {
  RoutingSizes sizes;
  const scalar_t* u;     // [B, I, E]
  const scalar_t* W;     // [I, J, D, E]
  const scalar_t* bias;  // [J, D] or nullptr
  scalar_t* v;           // [B, J, D]               output
  scalar_t* s_saved;     // [B, r, J, D]            output: s_k before squash
  scalar_t* couplings;   // [B, r, J, I]            output: c_k[i, j]
  scalar_t* partials;    // [B, num_chunks, J, D]   workspace: partial sums of s_k
  int iteration;         // k
};

template <typename scalar_t>
struct BackwardParams {
  RoutingSizes sizes;
  const scalar_t* grad_v;      // [B, J, D]
  const scalar_t* u;           // [B, I, E]
  const scalar_t* W;           // [I, J, D, E]
  const scalar_t* s_saved;     // [B, r, J, D]
  const scalar_t* couplings;   // [B, r, J, I]
  scalar_t* grad_u;            // [B, I, E]               output
  scalar_t* grad_W;            // [I, J, D, E]            output
  scalar_t* grad_bias;         // [J, D]                  output
  scalar_t* partials;          // [B, num_chunks, J, D]   workspace: partial sums of dL/dv_k
  scalar_t* grad_s;            // [B, r, J, D]            workspace: gs_k = dL/ds_k
  scalar_t* squashed;          // [B, r, J, D]            workspace: v_k = squash(s_k)
  scalar_t* logit_grad;        // [r-1, I, J, B]          workspace: G_m = dL/db_m, m = 1..r-1
  int64_t grad_weight_inputs;  // inputs per block of grad_weight_kernel
  int grad_input_slice;        // input dimensions per shared-memory round of grad_input_kernel
  int iteration;               // m (backward_partial_sums_kernel) or k (backward_squash_kernel)
};

// ---------------------------------------------------------------------------------------
// Device helpers.
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T smaller(T a, T b) {
  return b < a ? b : a;
}

template <int kCount, typename scalar_t>
__device__ __forceinline__ void fill(scalar_t (&values)[kCount], scalar_t value) {
#pragma unroll
  for (int k = 0; k < kCount; ++k) {
    values[k] = value;
  }
}

// Register arrays are only indexed by compile-time constants (fully unrolled loops with a
// guard), so that they stay in registers instead of spilling to local memory.
template <int kMax, typename scalar_t>
__device__ __forceinline__ void load_vector(const scalar_t* __restrict__ src, int count, scalar_t (&dst)[kMax]) {
#pragma unroll
  for (int k = 0; k < kMax; ++k) {
    dst[k] = k < count ? src[k] : scalar_t(0);
  }
}

template <int kMax, typename scalar_t>
__device__ __forceinline__ void store_vector(const scalar_t (&src)[kMax], int count, scalar_t* __restrict__ dst) {
#pragma unroll
  for (int k = 0; k < kMax; ++k) {
    if (k < count) {
      dst[k] = src[k];
    }
  }
}

// 16-byte vector loads (one instruction for 4 floats or 2 doubles).
template <typename scalar_t>
struct Vector16;
template <>
struct Vector16<float> {
  using type = float4;
  static constexpr int kWidth = 4;
  __device__ static void unpack(const float4& v, float* out) {
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
};
template <>
struct Vector16<double> {
  using type = double2;
  static constexpr int kWidth = 2;
  __device__ static void unpack(const double2& v, double* out) {
    out[0] = v.x;
    out[1] = v.y;
  }
};

// Loads a row of u or of W (D_in values) into registers, zero beyond `count`.
template <typename Tile, typename scalar_t>
__device__ __forceinline__ void load_row(
    const scalar_t* __restrict__ row, int count, scalar_t (&out)[Tile::kMaxDimIn]) {
  if constexpr (Tile::kExactDimIn) {
    // count == kMaxDimIn, and the row is 16-byte aligned: routing_host.h aligns u and W,
    // and rows are kMaxDimIn * sizeof(scalar_t) (a multiple of 16) bytes apart.
    (void)count;
    using Vector = Vector16<scalar_t>;
    static_assert(Tile::kMaxDimIn % Vector::kWidth == 0, "rows must be whole 16-byte vectors");
    const auto* vectors = reinterpret_cast<const typename Vector::type*>(row);
#pragma unroll
    for (int k = 0; k < Tile::kMaxDimIn / Vector::kWidth; ++k) {
      Vector::unpack(vectors[k], out + k * Vector::kWidth);
    }
  } else {
#pragma unroll
    for (int e = 0; e < Tile::kMaxDimIn; ++e) {
      out[e] = e < count ? row[e] : scalar_t(0);
    }
  }
}

// The row u[b, i, :] of this thread's sample, or zeros for a lane past the batch.
template <typename Tile, typename scalar_t>
__device__ __forceinline__ void load_input(
    const scalar_t* __restrict__ u, const RoutingSizes& n, bool active, int64_t b, int64_t i,
    scalar_t (&u_i)[Tile::kMaxDimIn]) {
  if (active) {
    load_row<Tile>(u + n.input_row(b, i), n.dim_in, u_i);
  } else {
    fill(u_i, scalar_t(0));
  }
}

// Eq. 2, the prediction of input capsule i for output capsule j:  u_hat[j|i] = W[i, j] u[i].
template <typename Tile, typename scalar_t>
__device__ __forceinline__ void predict(
    const scalar_t* __restrict__ W_ij, const scalar_t (&u_i)[Tile::kMaxDimIn], const RoutingSizes& n,
    scalar_t (&u_hat)[Tile::kMaxDimOut]) {
#pragma unroll
  for (int d = 0; d < Tile::kMaxDimOut; ++d) {
    scalar_t value = 0;
    if (d < n.dim_out) {
      scalar_t w[Tile::kMaxDimIn];
      load_row<Tile>(W_ij + d * n.dim_in, n.dim_in, w);
#pragma unroll
      for (int e = 0; e < Tile::kMaxDimIn; ++e) {
        if (Tile::kExactDimIn || e < n.dim_in) {
          value += w[e] * u_i[e];
        }
      }
    }
    u_hat[d] = value;
  }
}

template <int kMax, typename scalar_t>
__device__ __forceinline__ scalar_t dot(const scalar_t (&a)[kMax], const scalar_t (&b)[kMax], int count) {
  scalar_t total = 0;
#pragma unroll
  for (int d = 0; d < kMax; ++d) {
    if (d < count) {
      total += a[d] * b[d];
    }
  }
  return total;
}

// V_k[j] = v_0[j] + ... + v_{k-1}[j] for this thread's sample, with v_k' = squash(s_k')
// (Eq. 1) recomputed from s_saved: the logits of iteration k are b_k[i, j] = <u_hat[j|i], V_k[j]>.
template <int kMaxDimOut, typename scalar_t>
__device__ __forceinline__ void agreement_vector(
    const scalar_t* __restrict__ s_saved, const RoutingSizes& n, bool active, int64_t b, int j, int k,
    scalar_t (&V)[kMaxDimOut]) {
  fill(V, scalar_t(0));
  if (!active) {
    return;
  }
  for (int earlier = 0; earlier < k; ++earlier) {
    const scalar_t* s = s_saved + n.iteration_vector(b, earlier, j);
    scalar_t s_j[kMaxDimOut];
    scalar_t sq_norm = 0;
#pragma unroll
    for (int d = 0; d < kMaxDimOut; ++d) {
      s_j[d] = d < n.dim_out ? s[d] : scalar_t(0);
      sq_norm += s_j[d] * s_j[d];
    }
    const scalar_t scale = squash_scale(sq_norm);
#pragma unroll
    for (int d = 0; d < kMaxDimOut; ++d) {
      V[d] += scale * s_j[d];
    }
  }
}

// The J threads (lane, 0..J-1) of a routing block that hold the same sample publish one
// value each in shared memory, so that each can reduce over the output capsules j (the
// softmax of Eq. 3 and its backward). Two buffers, used in turn: a thread writes a buffer
// again only after the barrier of the exchange in between, which every thread reaches
// after it has read that buffer; so one barrier per exchange suffices.
template <typename scalar_t>
struct CapsuleExchange {
  scalar_t* buffers;  // [2][J][lanes]
  int lanes;          // blockDim.x
  int num_out;        // J
  int next = 0;

  // Publishes `value` as that of (lane, j) and returns this lane's column: entry k * lanes
  // is capsule k's value. Every thread of the block must call it together (a barrier).
  __device__ const scalar_t* gather(int lane, int j, scalar_t value) {
    scalar_t* buffer = buffers + next * num_out * lanes;
    next ^= 1;
    buffer[j * lanes + lane] = value;
    __syncthreads();
    return buffer + lane;
  }
};

// c[i, j] = softmax_j(b[i, :])[j] (Eq. 3) for the calling thread (lane, j), max-subtracted
// and summed in the order k = 0..J-1, as softmax_row in routing_math.h.
template <typename scalar_t>
__device__ __forceinline__ scalar_t coupling_softmax(
    CapsuleExchange<scalar_t>& exchange, int lane, int j, scalar_t logit) {
  const scalar_t* logits = exchange.gather(lane, j, logit);
  scalar_t row_max = logits[0];
  for (int k = 1; k < exchange.num_out; ++k) {
    const scalar_t other = logits[k * exchange.lanes];
    row_max = other > row_max ? other : row_max;
  }
  const scalar_t e = std::exp(logit - row_max);
  const scalar_t* exps = exchange.gather(lane, j, e);
  scalar_t total = 0;
  for (int k = 0; k < exchange.num_out; ++k) {
    total += exps[k * exchange.lanes];
  }
  return e * (scalar_t(1) / total);
}

// The forward's couplings go to couplings[b, k, j, i], inputs innermost. A thread holds one
// (b, j) and walks through i, so its own stores would each touch a different 32-byte sector;
// instead the block stages a run of inputs (32 bytes of couplings per (b, j)) in shared
// memory and stores whole sectors.
template <typename scalar_t>
struct CouplingStaging {
  scalar_t* staged;  // [lanes * J][run + 1]; the +1 spreads a warp's accesses over the banks
  int run;           // inputs per run

  __device__ void put(const RoutingSizes& n, int lane, int j, int offset, scalar_t c) const {
    staged[(lane * n.num_out + j) * (run + 1) + offset] = c;
  }

  // Every thread of the block: stores the staged couplings of inputs [first, first + count)
  // for the block's samples, consecutive threads taking consecutive inputs.
  __device__ void flush(
      scalar_t* __restrict__ couplings, const RoutingSizes& n, int k, int64_t first, int count) const {
    __syncthreads();  // every put() of this run is done
    const int threads = blockDim.x * blockDim.y;
    const int rows = n.samples_per_block * n.num_out;
    for (int index = threadIdx.y * blockDim.x + threadIdx.x; index < rows * run; index += threads) {
      const int offset = index % run;
      const int row = index / run;
      const int64_t b = int64_t(blockIdx.x) * n.samples_per_block + row / n.num_out;
      if (offset < count && b < n.batch) {
        couplings[n.coupling(b, k, row % n.num_out, first + offset)] = staged[row * (run + 1) + offset];
      }
    }
    __syncthreads();  // staged is read before the next run's put()
  }
};

// Where a routing-kernel thread works: sample b = blockIdx.x * lanes + lane, output capsule
// j = threadIdx.y, input capsules [i_begin, i_end) = chunk blockIdx.y. Lanes past the batch
// stay in the block (they must reach every barrier) but read and write nothing.
struct RoutingThread {
  int lane;
  int j;
  int64_t b;
  bool active;
  int64_t chunk;
  int64_t i_begin;
  int64_t i_end;

  __device__ static RoutingThread locate(const RoutingSizes& n) {
    RoutingThread t;
    t.lane = threadIdx.x;
    t.j = threadIdx.y;
    t.b = int64_t(blockIdx.x) * n.samples_per_block + t.lane;
    t.active = t.b < n.batch;
    t.chunk = blockIdx.y;
    t.i_begin = t.chunk * n.inputs_per_chunk;
    t.i_end = smaller(t.i_begin + n.inputs_per_chunk, n.num_in);
    return t;
  }
};

// ---------------------------------------------------------------------------------------
// Forward. Per iteration k: forward_partial_sums_kernel, then forward_squash_kernel.
// ---------------------------------------------------------------------------------------

// partials[b, chunk, j, :] = sum_{i in chunk} c_k[i, j] u_hat[j|i]      (Eq. 2, part of the sum)
// and couplings[b, k, j, i] = c_k[i, j] for the chunk's inputs.
// Grid (b-tiles, chunks), block (lanes, J). u_hat is recomputed from W and u and never
// stored; c_k = softmax_j(<u_hat[j|i], V_k[j]>) (Eq. 3), uniform 1/J at k = 0.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(Tile::kMaxThreads)
    forward_partial_sums_kernel(const ForwardParams<scalar_t> p) {
  const RoutingSizes& n = p.sizes;
  const RoutingThread t = RoutingThread::locate(n);
  scalar_t* shared = dynamic_shared_memory<scalar_t>();
  CapsuleExchange<scalar_t> exchange{shared, n.samples_per_block, n.num_out};
  const CouplingStaging<scalar_t> staging{shared + exchange_elements(n.num_out, n.samples_per_block), n.coupling_run};

  scalar_t agreement[Tile::kMaxDimOut];
  agreement_vector(p.s_saved, n, t.active, t.b, t.j, p.iteration, agreement);
  // softmax of all-zero logits is exactly 1/J (exp(0) = 1, and a sum of J ones is exact).
  const scalar_t uniform_coupling = scalar_t(1) / scalar_t(n.num_out);

  scalar_t s_partial[Tile::kMaxDimOut];
  fill(s_partial, scalar_t(0));
  for (int64_t first = t.i_begin; first < t.i_end; first += staging.run) {
    const int count = int(smaller(int64_t(staging.run), t.i_end - first));
    for (int offset = 0; offset < count; ++offset) {
      const int64_t i = first + offset;
      scalar_t u_i[Tile::kMaxDimIn];
      load_input<Tile>(p.u, n, t.active, t.b, i, u_i);
      scalar_t u_hat[Tile::kMaxDimOut];
      predict<Tile>(p.W + n.weight_matrix(i, t.j), u_i, n, u_hat);
      // The branch is uniform over the grid, so the barriers inside coupling_softmax are too.
      const scalar_t c = p.iteration == 0
          ? uniform_coupling
          : coupling_softmax(exchange, t.lane, t.j, dot(u_hat, agreement, n.dim_out));
#pragma unroll
      for (int d = 0; d < Tile::kMaxDimOut; ++d) {
        s_partial[d] += c * u_hat[d];
      }
      staging.put(n, t.lane, t.j, offset, c);
    }
    staging.flush(p.couplings, n, p.iteration, first, count);
  }
  if (t.active) {
    store_vector(s_partial, n.dim_out, p.partials + n.partial_vector(t.b, t.chunk, t.j));
  }
}

// s_k[b] = (sum of the chunks' partial sums, in chunk order) + bias  -> s_saved[b, k];
// at the last iteration also v[b, j] = squash(s_k[b, j]) (Eq. 1).
// One block per sample; threads stride over the J * D columns, then over the J capsules.
template <typename scalar_t>
__global__ void __launch_bounds__(kColumnKernelMaxThreads)
    forward_squash_kernel(const ForwardParams<scalar_t> p) {
  const RoutingSizes& n = p.sizes;
  const int64_t b = blockIdx.x;
  const int64_t columns = n.columns();
  const scalar_t* partial = p.partials + n.partial_vector(b, 0, 0);
  scalar_t* s = p.s_saved + n.iteration_vector(b, p.iteration, 0);
  for (int64_t col = threadIdx.x; col < columns; col += blockDim.x) {
    scalar_t total = 0;
    for (int64_t chunk = 0; chunk < n.num_chunks; ++chunk) {
      total += partial[chunk * columns + col];
    }
    if (p.bias != nullptr) {
      total += p.bias[col];
    }
    s[col] = total;
  }
  if (p.iteration + 1 < n.iterations) {
    return;  // the whole block leaves: no barrier below is left waiting
  }
  __syncthreads();  // the other threads' columns of s are written
  for (int j = threadIdx.x; j < n.num_out; j += blockDim.x) {
    const scalar_t* s_j = s + int64_t(j) * n.dim_out;
    scalar_t sq_norm = 0;
    for (int d = 0; d < n.dim_out; ++d) {
      sq_norm += s_j[d] * s_j[d];
    }
    const scalar_t scale = squash_scale(sq_norm);
    scalar_t* v_j = p.v + n.output_vector(b, j);
    for (int d = 0; d < n.dim_out; ++d) {
      v_j[d] = scale * s_j[d];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward: a reverse sweep over the iterations, then dL/dW, dL/dbias and dL/du.
//   G_r = 0;  for k = r-1 .. 0:
//     dL/dv_k = (k == r-1) ? grad_v : sum_i G_{k+1}[i, j] u_hat[j|i]     (b_{k+1} = b_k + <u_hat, v_k>)
//     gs_k    = squash backward of dL/dv_k at s_k                         (Eq. 1)
//     G_k     = G_{k+1} + c_k (gc_k - <c_k, gc_k>),  gc_k[i, j] = <gs_k[j], u_hat[j|i]>   (Eq. 3)
//   dL/du_hat[j|i] = sum_k c_k[i, j] gs_k[j] + sum_{k<r-1} G_{k+1}[i, j] v_k[j]
// backward_partial_sums_kernel(m) computes G_m and the partial sums of dL/dv_{m-1};
// backward_squash_kernel(k) finishes dL/dv_k and computes gs_k. The couplings c_k come from
// the forward (the op's `couplings` argument); c_0 = 1/J is used as a constant.
// ---------------------------------------------------------------------------------------

// gs_k[b] from dL/dv_k[b] (grad_v at k = r-1, else the sum of the chunks' partial sums):
//   gs = f(q) dL/dv + 2 f'(q) <s, dL/dv> s,  q = |s|^2   (squash_scale, squash_grad_outer_coeff)
// Also stores v_k = squash(s_k), used by grad_weight_kernel and grad_input_kernel.
// One block per sample, as forward_squash_kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kColumnKernelMaxThreads)
    backward_squash_kernel(const BackwardParams<scalar_t> p) {
  const RoutingSizes& n = p.sizes;
  const int64_t b = blockIdx.x;
  const int k = p.iteration;
  const int64_t columns = n.columns();
  // grad_s[b, k] first holds dL/dv_k, which the per-capsule loop turns into dL/ds_k in place.
  scalar_t* grad = p.grad_s + n.iteration_vector(b, k, 0);
  if (k + 1 == n.iterations) {
    const scalar_t* grad_v = p.grad_v + n.output_vector(b, 0);
    for (int64_t col = threadIdx.x; col < columns; col += blockDim.x) {
      grad[col] = grad_v[col];
    }
  } else {
    const scalar_t* partial = p.partials + n.partial_vector(b, 0, 0);
    for (int64_t col = threadIdx.x; col < columns; col += blockDim.x) {
      scalar_t total = 0;
      for (int64_t chunk = 0; chunk < n.num_chunks; ++chunk) {
        total += partial[chunk * columns + col];
      }
      grad[col] = total;
    }
  }
  __syncthreads();  // the other threads' columns of dL/dv_k are written
  const scalar_t* s = p.s_saved + n.iteration_vector(b, k, 0);
  scalar_t* v = p.squashed + n.iteration_vector(b, k, 0);
  for (int j = threadIdx.x; j < n.num_out; j += blockDim.x) {
    const int64_t row = int64_t(j) * n.dim_out;
    scalar_t sq_norm = 0;
    scalar_t s_dot_grad = 0;
    for (int d = 0; d < n.dim_out; ++d) {
      sq_norm += s[row + d] * s[row + d];
      s_dot_grad += s[row + d] * grad[row + d];
    }
    const scalar_t scale = squash_scale(sq_norm);
    const scalar_t outer = squash_grad_outer_coeff(sq_norm) * s_dot_grad;
    for (int d = 0; d < n.dim_out; ++d) {
      grad[row + d] = scale * grad[row + d] + outer * s[row + d];
      v[row + d] = scale * s[row + d];
    }
  }
}

// For iteration m = p.iteration (1..r-1), per input capsule i of the chunk, with c_m from
// the forward's couplings:
//   gc_m[i, j] = <gs_m[j], u_hat[j|i]>,  G_m[i, j] = G_{m+1}[i, j] + c_m (gc_m - <c_m, gc_m>)
// (stored for grad_weight_kernel and grad_input_kernel), and
//   partials[b, chunk, j, :] = sum_{i in chunk} G_m[i, j] u_hat[j|i]     (part of dL/dv_{m-1}).
// Grid and block as forward_partial_sums_kernel.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(Tile::kMaxThreads)
    backward_partial_sums_kernel(const BackwardParams<scalar_t> p) {
  const RoutingSizes& n = p.sizes;
  const RoutingThread t = RoutingThread::locate(n);
  const int m = p.iteration;
  CapsuleExchange<scalar_t> exchange{dynamic_shared_memory<scalar_t>(), n.samples_per_block, n.num_out};

  scalar_t grad_s[Tile::kMaxDimOut];  // gs_m[b, j]
  fill(grad_s, scalar_t(0));
  if (t.active) {
    load_vector(p.grad_s + n.iteration_vector(t.b, m, t.j), n.dim_out, grad_s);
  }
  const bool has_later_logits = m + 1 < n.iterations;  // else G_{m+1} = 0

  scalar_t grad_v_partial[Tile::kMaxDimOut];
  fill(grad_v_partial, scalar_t(0));
  for (int64_t i = t.i_begin; i < t.i_end; ++i) {
    scalar_t u_i[Tile::kMaxDimIn];
    load_input<Tile>(p.u, n, t.active, t.b, i, u_i);
    scalar_t u_hat[Tile::kMaxDimOut];
    predict<Tile>(p.W + n.weight_matrix(i, t.j), u_i, n, u_hat);
    const scalar_t c = t.active ? p.couplings[n.coupling(t.b, m, t.j, i)] : scalar_t(0);
    const scalar_t grad_c = dot(grad_s, u_hat, n.dim_out);
    // <c_m, gc_m> over the output capsules, as softmax_row_dot in routing_math.h.
    const scalar_t* products = exchange.gather(t.lane, t.j, c * grad_c);
    scalar_t grad_dot = 0;
    for (int k = 0; k < n.num_out; ++k) {
      grad_dot += products[k * n.samples_per_block];
    }
    scalar_t logit_grad = c * (grad_c - grad_dot);
    if (t.active) {
      if (has_later_logits) {
        logit_grad += p.logit_grad[n.logit_grad(m + 1, i, t.j, t.b)];
      }
      p.logit_grad[n.logit_grad(m, i, t.j, t.b)] = logit_grad;
    }
#pragma unroll
    for (int d = 0; d < Tile::kMaxDimOut; ++d) {
      grad_v_partial[d] += logit_grad * u_hat[d];
    }
  }
  if (t.active) {
    store_vector(grad_v_partial, n.dim_out, p.partials + n.partial_vector(t.b, t.chunk, t.j));
  }
}

// dL/dW[i] = sum_b dL/du_hat[b, i] (outer) u[b, i]          (Eq. 2), samples summed in order b = 0..B-1,
// and, in block 0, dL/dbias = sum_b sum_k gs_k[b]           (bias enters every s_k).
// One block per p.grad_weight_inputs consecutive input capsules; thread <-> column (j, d).
// No atomics: every output element is summed by one thread in a fixed order.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(kColumnKernelMaxThreads)
    grad_weight_kernel(const BackwardParams<scalar_t> p) {
  constexpr int kInputs = Tile::kGradWeightInputs;
  const RoutingSizes& n = p.sizes;
  const int64_t i_begin = int64_t(blockIdx.x) * p.grad_weight_inputs;
  const int count = int(smaller(p.grad_weight_inputs, n.num_in - i_begin));
  const bool sums_bias = blockIdx.x == 0;
  const int64_t columns = n.columns();
  const scalar_t uniform_coupling = scalar_t(1) / scalar_t(n.num_out);  // c_0, as forward stored it

  for (int64_t col = threadIdx.x; col < columns; col += blockDim.x) {
    const int j = int(col / n.dim_out);
    const int d = int(col % n.dim_out);
    scalar_t grad_w[kInputs][Tile::kMaxDimIn];
#pragma unroll
    for (int ii = 0; ii < kInputs; ++ii) {
      fill(grad_w[ii], scalar_t(0));
    }
    scalar_t grad_bias = 0;

    for (int64_t b = 0; b < n.batch; ++b) {
      // dL/du_hat[b, i, j, d] for the block's inputs, iteration by iteration; each per-sample
      // value gs_k[b, j, d], v_k[b, j, d] is read once (iteration stride: `columns`).
      const scalar_t* grad_s = p.grad_s + n.iteration_vector(b, 0, j) + d;
      const scalar_t* squashed = p.squashed + n.iteration_vector(b, 0, j) + d;
      scalar_t grad_u_hat[kInputs];
      const scalar_t grad_s_0 = grad_s[0];
      scalar_t bias_term = grad_s_0;
#pragma unroll
      for (int ii = 0; ii < kInputs; ++ii) {
        grad_u_hat[ii] = uniform_coupling * grad_s_0;
      }
      for (int m = 1; m < n.iterations; ++m) {
        const scalar_t grad_s_m = grad_s[m * columns];
        const scalar_t v_before = squashed[(m - 1) * columns];
        bias_term += grad_s_m;
#pragma unroll
        for (int ii = 0; ii < kInputs; ++ii) {
          if (ii < count) {
            const int64_t i = i_begin + ii;
            grad_u_hat[ii] = grad_u_hat[ii] + p.couplings[n.coupling(b, m, j, i)] * grad_s_m +
                p.logit_grad[n.logit_grad(m, i, j, b)] * v_before;
          }
        }
      }
      grad_bias += bias_term;
#pragma unroll
      for (int ii = 0; ii < kInputs; ++ii) {
        if (ii < count) {
          scalar_t u_i[Tile::kMaxDimIn];
          load_row<Tile>(p.u + n.input_row(b, i_begin + ii), n.dim_in, u_i);
#pragma unroll
          for (int e = 0; e < Tile::kMaxDimIn; ++e) {
            grad_w[ii][e] += grad_u_hat[ii] * u_i[e];
          }
        }
      }
    }

#pragma unroll
    for (int ii = 0; ii < kInputs; ++ii) {
      if (ii < count) {
        store_vector(grad_w[ii], n.dim_in, p.grad_W + n.weight_matrix(i_begin + ii, j) + int64_t(d) * n.dim_in);
      }
    }
    if (sums_bias) {
      p.grad_bias[col] = grad_bias;
    }
  }
}

// dL/du[b, i] = sum_j W[i, j]^T dL/du_hat[b, i, j]            (Eq. 2)
// Grid and block as the routing kernels: thread (lane, j) computes W[i, j]^T dL/du_hat[j|i]
// for its sample; the sum over j meets in shared memory ([slice][J][lanes]), in rounds of
// p.grad_input_slice input dimensions, and is added in the order j = 0..J-1.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(Tile::kMaxThreads)
    grad_input_kernel(const BackwardParams<scalar_t> p) {
  const RoutingSizes& n = p.sizes;
  const RoutingThread t = RoutingThread::locate(n);
  const int lanes = n.samples_per_block;
  scalar_t* per_capsule = dynamic_shared_memory<scalar_t>();
  const scalar_t uniform_coupling = scalar_t(1) / scalar_t(n.num_out);  // c_0, as forward stored it

  for (int64_t i = t.i_begin; i < t.i_end; ++i) {
    // dL/du_hat[b, i, j, :] = c_0 gs_0 + sum_{m>=1} (c_m gs_m + G_m v_{m-1})
    scalar_t grad_u_hat[Tile::kMaxDimOut];
    fill(grad_u_hat, scalar_t(0));
    if (t.active) {
      const scalar_t* grad_s_0 = p.grad_s + n.iteration_vector(t.b, 0, t.j);
#pragma unroll
      for (int d = 0; d < Tile::kMaxDimOut; ++d) {
        if (d < n.dim_out) {
          grad_u_hat[d] = uniform_coupling * grad_s_0[d];
        }
      }
      for (int m = 1; m < n.iterations; ++m) {
        const scalar_t c = p.couplings[n.coupling(t.b, m, t.j, i)];
        const scalar_t logit_grad = p.logit_grad[n.logit_grad(m, i, t.j, t.b)];
        const scalar_t* grad_s_m = p.grad_s + n.iteration_vector(t.b, m, t.j);
        const scalar_t* v_before = p.squashed + n.iteration_vector(t.b, m - 1, t.j);
#pragma unroll
        for (int d = 0; d < Tile::kMaxDimOut; ++d) {
          if (d < n.dim_out) {
            grad_u_hat[d] = grad_u_hat[d] + c * grad_s_m[d] + logit_grad * v_before[d];
          }
        }
      }
    }
    // This capsule's term of dL/du[b, i]: W[i, j]^T dL/du_hat[j|i].
    scalar_t term[Tile::kMaxDimIn];
    fill(term, scalar_t(0));
    const scalar_t* W_ij = p.W + n.weight_matrix(i, t.j);
#pragma unroll
    for (int d = 0; d < Tile::kMaxDimOut; ++d) {
      if (d < n.dim_out) {
        scalar_t w[Tile::kMaxDimIn];
        load_row<Tile>(W_ij + d * n.dim_in, n.dim_in, w);
#pragma unroll
        for (int e = 0; e < Tile::kMaxDimIn; ++e) {
          term[e] += w[e] * grad_u_hat[d];
        }
      }
    }
    // Sum over j, p.grad_input_slice dimensions at a time (uniform loop: same bounds for all).
    for (int first = 0; first < n.dim_in; first += p.grad_input_slice) {
      const int width = smaller(p.grad_input_slice, n.dim_in - first);
#pragma unroll
      for (int e = 0; e < Tile::kMaxDimIn; ++e) {
        if (e >= first && e < first + width) {
          per_capsule[((e - first) * n.num_out + t.j) * lanes + t.lane] = term[e];
        }
      }
      __syncthreads();
      for (int e = t.j; e < width; e += n.num_out) {
        scalar_t total = 0;
        for (int k = 0; k < n.num_out; ++k) {
          total += per_capsule[(e * n.num_out + k) * lanes + t.lane];
        }
        if (t.active) {
          p.grad_u[n.input_row(t.b, i) + first + e] = total;
        }
      }
      __syncthreads();  // reads done before the next round overwrites per_capsule
    }
  }
}

}  // namespace capsnet::cuda
