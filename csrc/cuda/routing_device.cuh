// Device utilities of the CUDA routing kernels: loads with conversion to the op-math type,
// the prediction u_hat and the routing logit with a pinned order of operations, the capsule
// exchange through shared memory and the coupling step on it, and where a thread works.
//
// Compiled by nvcc (routing_kernel.cu) and by g++ with the CPU emulation of CUDA in
// csrc/simt. Keep the code inside what the emulator supports (csrc/simt/README.md): no
// inline PTX and no implicit warp-synchronous code; threads exchange data only through
// shared or global memory separated by __syncthreads().
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

// The emulator checks that every 16-byte vector load is 16-byte aligned (x86 does not care,
// a GPU faults); on the GPU this costs nothing.
#ifndef CAPSNET_ASSERT_VECTOR_ALIGNED
#define CAPSNET_ASSERT_VECTOR_ALIGNED(pointer) ((void)0)
#endif

template <typename T>
__device__ __forceinline__ T smaller(T a, T b) {
  return b < a ? b : a;
}

template <int kCount, typename T>
__device__ __forceinline__ void fill(T (&values)[kCount], T value) {
#pragma unroll
  for (int k = 0; k < kCount; ++k) {
    values[k] = value;
  }
}

// a * b + c rounded once, on every platform: the couplings must come out bitwise the same
// in the forward and in the backward's recomputation, so the compiler may not decide
// per kernel whether to contract a product and a sum.
template <typename T>
__device__ __forceinline__ T fused_multiply_add(T a, T b, T c) {
  return std::fma(a, b, c);
}

// a + b, never merged with the product that made b into one fused multiply-add (which the
// compiler may otherwise do in one kernel and not in another).
template <typename T>
__device__ __forceinline__ T add_unfused(T a, T b) {
#if defined(__CUDACC__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// ---------------------------------------------------------------------------------------
// Loads. Storage may be float16/bfloat16/float32/float64; arithmetic is in acc_t.
// ---------------------------------------------------------------------------------------

// 16 bytes of elements, loaded by one vector instruction.
template <typename scalar_t>
struct alignas(16) Vector16 {
  static constexpr int kWidth = int(16 / sizeof(scalar_t));
  scalar_t values[kWidth];
};

template <typename scalar_t>
__device__ __forceinline__ Vector16<scalar_t> load_vector16(const scalar_t* __restrict__ pointer) {
  CAPSNET_ASSERT_VECTOR_ALIGNED(pointer);
#if defined(__CUDACC__)
  return *reinterpret_cast<const Vector16<scalar_t>*>(pointer);
#else
  // The emulator has reported a misaligned pointer above; the copy itself must not be
  // undefined behaviour on the host (UBSan checks it in make test-cuda-asan).
  Vector16<scalar_t> vector;
  std::memcpy(&vector, pointer, sizeof(vector));
  return vector;
#endif
}

// A row of u or of W (D_in elements) into registers, zero beyond `count`.
template <typename Tile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ row, int64_t count, acc_t (&out)[Tile::kMaxDimIn]) {
  if constexpr (Tile::kExactDimIn) {
    // count == kMaxDimIn, and rows are 16-byte aligned: routing_host.h aligns u and W, and
    // rows are kMaxDimIn * sizeof(scalar_t) bytes apart, a multiple of 16 for every dtype.
    (void)count;
    constexpr int kWidth = Vector16<scalar_t>::kWidth;
    static_assert(Tile::kMaxDimIn % kWidth == 0, "rows must be whole 16-byte vectors");
#pragma unroll
    for (int k = 0; k < Tile::kMaxDimIn / kWidth; ++k) {
      const Vector16<scalar_t> chunk = load_vector16(row + k * kWidth);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        out[k * kWidth + e] = static_cast<acc_t>(chunk.values[e]);
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < Tile::kMaxDimIn; ++e) {
      out[e] = e < count ? static_cast<acc_t>(row[e]) : acc_t(0);
    }
  }
}

// `count` values of an op-math workspace into registers, zero beyond. kExact: count == kMax
// and the source is 16-byte aligned (the workspaces' vectors are D_out = 16 elements apart),
// so whole 16-byte vectors are loaded.
template <bool kExact, int kMax, typename acc_t>
__device__ __forceinline__ void load_vector(const acc_t* __restrict__ src, int64_t count, acc_t (&dst)[kMax]) {
  if constexpr (kExact && (kMax * sizeof(acc_t)) % 16 == 0) {
    constexpr int kWidth = Vector16<acc_t>::kWidth;
#pragma unroll
    for (int k = 0; k < kMax / kWidth; ++k) {
      const Vector16<acc_t> chunk = load_vector16(src + k * kWidth);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        dst[k * kWidth + e] = chunk.values[e];
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      dst[k] = (kExact || k < count) ? src[k] : acc_t(0);
    }
  }
}

template <int kMax, typename T>
__device__ __forceinline__ void store_vector(const T (&src)[kMax], int64_t count, T* __restrict__ dst) {
#pragma unroll
  for (int k = 0; k < kMax; ++k) {
    if (k < count) {
      dst[k] = src[k];
    }
  }
}

// ---------------------------------------------------------------------------------------
// The prediction and the logit (Eq. 2, Eq. 3's b_ij), in one fixed order of operations.
// ---------------------------------------------------------------------------------------

// u_hat[j|i] = W[i, j] u[i], each component summed over e = 0..E-1 with fused multiply-adds.
template <typename Tile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void predict(
    const scalar_t* __restrict__ W_ij, const acc_t (&u_i)[Tile::kMaxDimIn], int dim_out, int dim_in,
    acc_t (&u_hat)[Tile::kMaxDimOut]) {
  const int row_stride = Tile::kExactDimIn ? Tile::kMaxDimIn : dim_in;
#pragma unroll
  for (int d = 0; d < Tile::kMaxDimOut; ++d) {
    acc_t value = 0;
    if (Tile::kExactDimOut || d < dim_out) {
      acc_t w[Tile::kMaxDimIn];
      load_row<Tile>(W_ij + d * row_stride, dim_in, w);
#pragma unroll
      for (int e = 0; e < Tile::kMaxDimIn; ++e) {
        if (Tile::kExactDimIn || e < dim_in) {
          value = fused_multiply_add(w[e], u_i[e], value);
        }
      }
    }
    u_hat[d] = value;
  }
}

// <a, b> over the first `count` components (all kMax when exact), in order, with fused
// multiply-adds.
template <bool kExact, int kMax, typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t (&a)[kMax], const acc_t (&b)[kMax], int count) {
  acc_t total = 0;
#pragma unroll
  for (int d = 0; d < kMax; ++d) {
    if (kExact || d < count) {
      total = fused_multiply_add(a[d], b[d], total);
    }
  }
  return total;
}

// The routing logit of iteration k: b_k[i, j] = <u_hat[j|i], V_k[j]> + prior[i, j]
// (b_{k+1} = b_k + <u_hat, v_k> summed up: V_k = v_0 + ... + v_{k-1}).
template <bool kExact, int kMax, typename acc_t>
__device__ __forceinline__ acc_t routing_logit(const acc_t (&u_hat)[kMax], const acc_t (&agreement)[kMax], int count, acc_t prior) {
  return dot<kExact>(u_hat, agreement, count) + prior;
}

// V_d + squash(s)_d (Eq. 1) for component d of one capsule s: a step of the running sum of
// the outputs that the logits need. The forward's squash kernel and the backward's state
// recomputation both call this, so that both see the same V_k bit for bit.
template <int kMax, typename acc_t, typename Component>
__device__ __forceinline__ acc_t add_squashed(const Component& s, int64_t dim, int64_t d, acc_t V_d) {
  const SquashCoefficients<acc_t> k = squash_coefficients<kMax, acc_t>(s, dim);
  acc_t result = V_d;
  squash_forward<kMax>(k, s, dim, [&](auto component, acc_t value) {
    if (component == d) {
      result = add_unfused(V_d, value);
    }
  });
  return result;
}

// ---------------------------------------------------------------------------------------
// The capsule exchange, and the coupling step on it.
// ---------------------------------------------------------------------------------------

// 1 / x, correctly rounded (the value of the seam's T(1) / x): the GPU's reciprocal
// instruction with its rounding fix-up instead of a full division.
template <typename T>
__device__ __forceinline__ T reciprocal(T x) {
#if defined(__CUDACC__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __frcp_rn(x);
  } else {
    return __drcp_rn(x);
  }
#else
  return T(1) / x;
#endif
}

// The J threads (lane, 0..J-1) of a routing block that hold the same sample publish one
// value each in shared memory, so that each can reduce over the output capsules j (the
// coupling step of Eq. 3 and its backward). Each kind of reduction has its own buffer
// (kMax: the row maximum; kSum: the sum of exponentials; kDot: <c, dL/dc>), used in that
// order for every input capsule: a thread writes a buffer again only after the barriers of
// the other exchanges in between, which every thread reaches after it has read that
// buffer; so one barrier per exchange suffices.
//
// Tile::kLanes > 0 (the CapsNet tile, J <= kMaxNumOut): each sample's row holds kMaxNumOut
// entries (+ padding against bank conflicts); the entries past J hold the reduction's
// neutral value (-inf for the maximum, 0 for the sums, written once), so every thread
// reads its row with whole 16-byte loads and reduces kMaxNumOut entries without a bound
// check: the same result, in the same order k = 0..J-1 (adding zeros at the end changes
// no bit of a sum of positive terms). Otherwise: [J][lanes], J read in a loop.
enum ExchangeKind { kMaxExchange = 0, kSumExchange = 1, kDotExchange = 2 };

template <typename acc_t, typename Tile>
struct CapsuleExchange {
  static constexpr int kLanes = Tile::kLanes;
  static constexpr bool kRows = kLanes > 0;
  static constexpr int kMaxNumOut = kRows ? Tile::kMaxNumOut : 0;
  static constexpr int kRowStride = exchange_row_stride<Tile>(int(sizeof(acc_t)));

  acc_t* buffers;  // [kinds][lanes][kRowStride] or [kinds][J][lanes]
  int run_time_lanes;
  int num_out;  // J

  __device__ int lanes() const { return kRows ? kLanes : run_time_lanes; }

  // Every thread of the block, before the first exchange: the neutral entries past J.
  __device__ void prepare(int lane, int j) const {
    if constexpr (kRows) {
      if (j == 0) {
        for (int k = num_out; k < kMaxNumOut; ++k) {  // model-loop: 16 - num_out
          buffers[(kMaxExchange * kLanes + lane) * kRowStride + k] = -std::numeric_limits<acc_t>::infinity();
          buffers[(kSumExchange * kLanes + lane) * kRowStride + k] = acc_t(0);
          buffers[(kDotExchange * kLanes + lane) * kRowStride + k] = acc_t(0);
        }
      }
    }
  }

  // Publishes `value` as that of (lane, j) in the buffer of `kind` and reduces this lane's
  // row over k = 0..J-1 in order, from `start`: the maximum (a NaN entry is passed over, as
  // by the seam's comparison) or the sum. Every thread of the block must call it together.
  template <ExchangeKind kKind>
  __device__ acc_t reduce(int lane, int j, acc_t value, acc_t start) const {
    acc_t* buffer = buffers + kKind * num_out_rows() * (kRows ? kRowStride : lanes());
    acc_t result = start;
    if constexpr (kRows) {
      acc_t* row = buffer + lane * kRowStride;
      row[j] = value;
      __syncthreads();
      constexpr int kWidth = Vector16<acc_t>::kWidth;
#pragma unroll
      for (int chunk = 0; chunk < kMaxNumOut / kWidth; ++chunk) {
        const Vector16<acc_t> entries = load_vector16(row + chunk * kWidth);
#pragma unroll
        for (int e = 0; e < kWidth; ++e) {
          result = combine<kKind>(result, entries.values[e]);
        }
      }
    } else {
      const int n = lanes();
      buffer[j * n + lane] = value;
      __syncthreads();
      const acc_t* column = buffer + lane;
#pragma unroll 1
      for (int k = 0; k < num_out; ++k) {  // model-loop: num_out
        result = combine<kKind>(result, column[k * n]);
      }
    }
    return result;
  }

 private:
  __device__ int num_out_rows() const { return kRows ? kLanes : num_out; }

  template <ExchangeKind kKind>
  static __device__ acc_t combine(acc_t a, acc_t b) {
    if constexpr (kKind == kMaxExchange) {
      return std::fmax(a, b);
    } else {
      return a + b;
    }
  }
};

// c_ij for the calling thread (lane, j) from its logit b_ij: the coupling step of
// routing_math.h (row maximum, shifted exponential, reciprocal of the row's sum in the
// order k = 0..J-1), with the row met through the exchange.
template <typename acc_t, typename Tile>
__device__ __forceinline__ acc_t exchange_coupling(
    const CapsuleExchange<acc_t, Tile>& exchange, int lane, int j, acc_t logit, const RoutingOptions& options) {
  const acc_t row_max = exchange.template reduce<kMaxExchange>(lane, j, logit, coupling_max_start<acc_t>(options));
  const acc_t shifted_exp = std::exp(logit - row_max);
  const acc_t sum_start = coupling_sum_start<acc_t>(options, options.leaky ? std::exp(-row_max) : acc_t(0));
  const acc_t total = exchange.template reduce<kSumExchange>(lane, j, shifted_exp, sum_start);
  return coupling_from(shifted_exp, reciprocal(total));
}

// A per-thread D_out-vector that a routing kernel keeps for its whole chunk. Generic tile:
// in registers. CapsNet tile: in the thread's row of shared memory (ThreadRow::elements per
// block, after the exchange's buffers; rows padded so that 16-byte loads of 8 consecutive
// threads hit different banks), so that the hot loop's registers go to the predictions.
template <typename acc_t, typename Tile>
struct ThreadRow {
  static constexpr bool kInRegisters = Tile::kLanes == 0;
  static constexpr int kStride = thread_row_stride<Tile>(int(sizeof(acc_t)));
  acc_t* row;

  __device__ ThreadRow(acc_t* rows, int thread) : row(rows + thread * kStride) {}

  // Stores `values` where the row lives: `registers` (kInRegisters) or shared memory.
  template <int kDim, int kKept>
  __device__ void keep(const acc_t (&values)[kDim], acc_t (&registers)[kKept]) const {
    if constexpr (kInRegisters) {
#pragma unroll
      for (int d = 0; d < kDim; ++d) {
        registers[d] = values[d];
      }
    } else {
#pragma unroll
      for (int d = 0; d < kDim; ++d) {
        row[d] = values[d];
      }
    }
  }

  // <row, other> over the first `count` components, in order, with fused multiply-adds.
  template <int kDim, int kKept>
  __device__ acc_t dot(const acc_t (&registers)[kKept], const acc_t (&other)[kDim], int count) const {
    if constexpr (kInRegisters) {
      return capsnet::cuda::dot<Tile::kExactDimOut>(registers, other, count);
    } else {
      acc_t values[kDim];
      load_vector<Tile::kExactDimOut>(row, count, values);
      return capsnet::cuda::dot<Tile::kExactDimOut>(values, other, count);
    }
  }
};

// ---------------------------------------------------------------------------------------
// The per-sample kernels (forward_squash_kernel, backward_squash_kernel): block b of the grid's
// x holds sample b and `capsules` output capsules (from capsules * blockIdx.y), one thread per
// component (j, d). The capsules' vectors meet in shared memory ([capsules][D] per vector),
// where every thread of a capsule reads the whole vector for the squash's coefficients
// (the same for all of them) and writes its own component.
// ---------------------------------------------------------------------------------------
struct CapsuleColumns {
  int64_t b;
  int64_t first_capsule;
  int capsules;   // per block
  int64_t j;      // this thread's column (j, d), valid if has_column
  int64_t d;
  bool has_column;
  int local;      // threadIdx.x: the column's place in a [capsules][D] vector of the block

  __device__ static CapsuleColumns locate(const RoutingShape& n) {
    CapsuleColumns c;
    c.b = blockIdx.x;
    c.capsules = int(blockDim.x / n.dim_out);
    c.first_capsule = int64_t(blockIdx.y) * c.capsules;
    c.j = c.first_capsule + threadIdx.x / n.dim_out;
    c.d = threadIdx.x % n.dim_out;
    c.has_column = threadIdx.x < c.capsules * n.dim_out && c.j < n.num_out;
    c.local = threadIdx.x;
    return c;
  }

  // Component d' of this thread's capsule in a [capsules][D] vector of shared memory.
  template <typename acc_t>
  __device__ auto capsule_of(const acc_t* vectors, int64_t dim_out) const {
    const acc_t* capsule = vectors + (local - d);
    return [capsule](auto component) { return capsule[component]; };
  }
};

// ---------------------------------------------------------------------------------------
// Where a routing-kernel thread works: sample b = blockIdx.x * lanes + lane, output capsule
// j = threadIdx.y, input capsules [i_begin, i_end) = chunk blockIdx.y. Lanes past the batch
// stay in the block (they must reach every barrier) but read and write nothing.
// ---------------------------------------------------------------------------------------
struct RoutingThread {
  int lane;
  int j;
  int b;  // 32-bit: the planner keeps B below 2^31
  bool active;
  int chunk;
  int i_begin;
  int i_end;

  __device__ static RoutingThread locate(const RoutingGeometry& g) {
    RoutingThread t;
    t.lane = threadIdx.x;
    t.j = threadIdx.y;
    t.b = int(blockIdx.x) * g.part.samples_per_block + t.lane;
    t.active = t.b < g.shape.batch;
    t.chunk = blockIdx.y;
    t.i_begin = int(t.chunk * g.part.inputs_per_chunk);
    t.i_end = int(smaller(int64_t(t.i_begin) + g.part.inputs_per_chunk, g.shape.num_in));
    return t;
  }
};

// The couplings of iteration 0: the prior's (one row per input capsule, the same for every
// sample), or uniform without a prior.
template <typename acc_t>
__device__ __forceinline__ acc_t initial_coupling(
    const acc_t* __restrict__ prior_couplings, const RoutingGeometry& g, int64_t i, int64_t j,
    const RoutingOptions& options) {
  return prior_couplings != nullptr ? prior_couplings[g.pair(i, j)]
                                    : uniform_coupling<acc_t>(g.shape.num_out, options);
}

}  // namespace capsnet::cuda
