// Device utilities of the CUDA routing kernels: loads with conversion to the op-math type,
// the prediction u_hat and the routing logit with a pinned order of operations, squash of a
// capsule held by one thread, the capsule exchange through shared memory and the coupling
// step on it, and where a thread works.
//
// Compiled by nvcc (routing_kernel.cu) and by g++ with the CPU emulation of CUDA in
// csrc/simt. Keep the code inside what the emulator supports (csrc/simt/README.md): no
// inline PTX and no implicit warp-synchronous code; threads exchange data only through
// shared or global memory separated by __syncthreads() (or, between blocks, the chunk
// tree's fence and counter: routing_tree.cuh).
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

template <int kRows, int kCount, typename T>
__device__ __forceinline__ void fill(T (&values)[kRows][kCount], T value) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    fill(values[r], value);
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

template <typename scalar_t>
__device__ __forceinline__ void store_vector16(const Vector16<scalar_t>& vector, scalar_t* __restrict__ pointer) {
  CAPSNET_ASSERT_VECTOR_ALIGNED(pointer);
#if defined(__CUDACC__)
  *reinterpret_cast<Vector16<scalar_t>*>(pointer) = vector;
#else
  std::memcpy(pointer, &vector, sizeof(vector));
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

// A D_out-row of a tensor in the storage type (the bias [J, D]) into registers, zero beyond
// `count`: 16-byte loads in the CapsNet tile (the host aligns the bias, kernel_input; rows
// are D_out = 16 elements, a multiple of 16 bytes for every dtype).
template <typename Tile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_output_row(const scalar_t* __restrict__ row, int64_t count, acc_t (&out)[Tile::kMaxDimOut]) {
  if constexpr (Tile::kExactDimOut) {
    constexpr int kWidth = Vector16<scalar_t>::kWidth;
    static_assert(Tile::kMaxDimOut % kWidth == 0, "rows must be whole 16-byte vectors");
#pragma unroll
    for (int k = 0; k < Tile::kMaxDimOut / kWidth; ++k) {
      const Vector16<scalar_t> chunk = load_vector16(row + k * kWidth);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        out[k * kWidth + e] = static_cast<acc_t>(chunk.values[e]);
      }
    }
  } else {
#pragma unroll
    for (int d = 0; d < Tile::kMaxDimOut; ++d) {
      out[d] = d < count ? static_cast<acc_t>(row[d]) : acc_t(0);
    }
  }
}

// ... and back (v [B, J, D], a fresh allocation: aligned), converted to the storage type.
template <typename Tile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_output_row(const acc_t (&values)[Tile::kMaxDimOut], int64_t count, scalar_t* __restrict__ row) {
  if constexpr (Tile::kExactDimOut) {
    constexpr int kWidth = Vector16<scalar_t>::kWidth;
#pragma unroll
    for (int k = 0; k < Tile::kMaxDimOut / kWidth; ++k) {
      Vector16<scalar_t> chunk;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        chunk.values[e] = static_cast<scalar_t>(values[k * kWidth + e]);
      }
      store_vector16(chunk, row + k * kWidth);
    }
  } else {
#pragma unroll
    for (int d = 0; d < Tile::kMaxDimOut; ++d) {
      if (d < count) {
        row[d] = static_cast<scalar_t>(values[d]);
      }
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

// `count` values into a workspace; kExact as for load_vector.
template <bool kExact, int kMax, typename T>
__device__ __forceinline__ void store_vector(const T (&src)[kMax], int64_t count, T* __restrict__ dst) {
  if constexpr (kExact && (kMax * sizeof(T)) % 16 == 0) {
    constexpr int kWidth = Vector16<T>::kWidth;
#pragma unroll
    for (int k = 0; k < kMax / kWidth; ++k) {
      Vector16<T> chunk;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        chunk.values[e] = src[k * kWidth + e];
      }
      store_vector16(chunk, dst + k * kWidth);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (kExact || k < count) {
        dst[k] = src[k];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The prediction and the logit (Eq. 2, Eq. 3's b_ij), in one fixed order of operations.
// ---------------------------------------------------------------------------------------

// acc[s] += W[i, j] u[s][i] for the kSamples samples of a thread: each row of W is loaded
// once and serves every sample; component d is accumulated over e = 0..E-1 with fused
// multiply-adds starting from acc[s][d].
template <typename Tile, int kSamples, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_prediction(
    const scalar_t* __restrict__ W_ij, const acc_t (&u_i)[kSamples][Tile::kMaxDimIn], int dim_out, int dim_in,
    acc_t (&acc)[kSamples][Tile::kMaxDimOut]) {
  const int row_stride = Tile::kExactDimIn ? Tile::kMaxDimIn : dim_in;
#pragma unroll
  for (int d = 0; d < Tile::kMaxDimOut; ++d) {
    if (Tile::kExactDimOut || d < dim_out) {
      acc_t w[Tile::kMaxDimIn];
      load_row<Tile>(W_ij + d * row_stride, dim_in, w);
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        acc_t value = acc[s][d];
#pragma unroll
        for (int e = 0; e < Tile::kMaxDimIn; ++e) {
          if (Tile::kExactDimIn || e < dim_in) {
            value = fused_multiply_add(w[e], u_i[s][e], value);
          }
        }
        acc[s][d] = value;
      }
    }
  }
}

// u_hat[s][j|i] = W[i, j] u[s][i] (Eq. 2), zero past D_out; the same order of operations
// in every kernel (the couplings depend on it bit for bit).
template <typename Tile, int kSamples, typename scalar_t, typename acc_t>
__device__ __forceinline__ void predict(
    const scalar_t* __restrict__ W_ij, const acc_t (&u_i)[kSamples][Tile::kMaxDimIn], int dim_out, int dim_in,
    acc_t (&u_hat)[kSamples][Tile::kMaxDimOut]) {
  fill(u_hat, acc_t(0));
  add_prediction<Tile>(W_ij, u_i, dim_out, dim_in, u_hat);
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

// ---------------------------------------------------------------------------------------
// Squash (Eq. 1) of one capsule that a thread holds whole (all D_out components), through
// the seam's functions.
// ---------------------------------------------------------------------------------------

// v = squash(s).
template <int kDim, typename acc_t>
__device__ __forceinline__ void squash_capsule(const acc_t (&s)[kDim], int dim, acc_t (&v)[kDim]) {
  const auto component = [&](auto d) { return s[d]; };
  const SquashCoefficients<acc_t> k = squash_coefficients<kDim, acc_t>(component, dim);
  fill(v, acc_t(0));
  squash_forward<kDim>(k, component, dim, [&](auto d, acc_t value) { v[d] = value; });
}

// V <- V + v with v = squash(s): a step of the running sum V_k = v_0 + ... + v_{k-1} that
// the logits need. The forward (after each iteration) and the backward (recomputing the
// state from s_saved) both call this, so that both see the same V_k bit for bit.
template <int kDim, typename acc_t>
__device__ __forceinline__ void add_squashed(const acc_t (&v)[kDim], acc_t (&V)[kDim]) {
#pragma unroll
  for (int d = 0; d < kDim; ++d) {
    V[d] = add_unfused(V[d], v[d]);
  }
}

// grad_s = squash backward of grad_v at s.
template <int kDim, typename acc_t>
__device__ __forceinline__ void squash_capsule_backward(
    const acc_t (&s)[kDim], const acc_t (&grad_v)[kDim], int dim, acc_t (&grad_s)[kDim]) {
  const auto component = [&](auto d) { return s[d]; };
  const SquashCoefficients<acc_t> k = squash_coefficients<kDim, acc_t>(component, dim);
  fill(grad_s, acc_t(0));
  squash_backward<kDim>(k, component, [&](auto d) { return grad_v[d]; }, dim, [&](auto d, acc_t value) { grad_s[d] = value; });
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

// The J threads (lane, 0..J-1) of a routing block that hold the same samples publish one
// value per sample each in shared memory, so that each can reduce over the output capsules
// j (the coupling step of Eq. 3 and its backward). Each kind of reduction has its own
// buffer (kMax: the row maximum; kSum: the sum of exponentials; kDot: <c, dL/dc>), used in
// that order for every input capsule: a thread writes a buffer again only after the
// barriers of the other exchanges in between, which every thread reaches after it has read
// that buffer; so one barrier per exchange suffices, for all of a thread's samples at once.
//
// Tile::kLanes > 0 (the CapsNet tile, J <= kMaxNumOut): each (sample slot, lane)'s row
// holds kMaxNumOut entries (+ padding to whole 16-byte vectors and against bank
// conflicts); the entries past J hold the reduction's neutral value (-inf for the maximum,
// 0 for the sums, written once), so every thread reads its rows with whole 16-byte loads
// and reduces kMaxNumOut entries without a bound check: the same result, in the same order k = 0..J-1 (adding zeros at the end
// changes no bit of a sum of positive terms). Otherwise (one sample per thread): [J][lanes],
// J read in a loop.
enum ExchangeKind { kMaxExchange = 0, kSumExchange = 1, kDotExchange = 2 };

template <typename acc_t, typename Tile>
struct CapsuleExchange {
  static constexpr int kLanes = Tile::kLanes;
  static constexpr int kSamples = samples_per_thread<Tile>(int(sizeof(acc_t)));
  static constexpr bool kRows = kLanes > 0;
  static constexpr int kMaxNumOut = kRows ? Tile::kMaxNumOut : 0;
  static constexpr int kRowStride = exchange_row_stride<Tile>(int(sizeof(acc_t)));
  static_assert(kRows || kSamples == 1, "run-time lanes hold one sample per thread");

  acc_t* buffers;  // [kinds][samples][lanes][kRowStride] or [kinds][J][lanes]
  int run_time_lanes;
  int num_out;  // J

  __device__ int lanes() const { return kRows ? kLanes : run_time_lanes; }

  // Every thread of the block, before the first exchange: the neutral entries past J.
  __device__ void prepare(int lane, int j) const {
    if constexpr (kRows) {
      if (j == 0) {
#pragma unroll
        for (int s = 0; s < kSamples; ++s) {
#pragma unroll
          for (int k = 0; k < kMaxNumOut; ++k) {
            if (k >= num_out) {
              buffers[((kMaxExchange * kSamples + s) * kLanes + lane) * kRowStride + k] =
                  -std::numeric_limits<acc_t>::infinity();
              buffers[((kSumExchange * kSamples + s) * kLanes + lane) * kRowStride + k] = acc_t(0);
              buffers[((kDotExchange * kSamples + s) * kLanes + lane) * kRowStride + k] = acc_t(0);
            }
          }
        }
      }
    }
  }

  // Publishes values[s] as that of (sample slot s, lane, j) in the buffer of `kind` and
  // reduces each of this thread's rows over k = 0..J-1 in order, from starts[s]: the
  // maximum (a NaN entry is passed over, as by the seam's comparison) or the sum. Every
  // thread of the block must call it together.
  template <ExchangeKind kKind>
  __device__ void reduce(int lane, int j, const acc_t (&values)[kSamples], const acc_t (&starts)[kSamples],
                         acc_t (&results)[kSamples]) const {
    if constexpr (kRows) {
      acc_t* buffer = buffers + kKind * kSamples * kLanes * kRowStride;
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        buffer[(s * kLanes + lane) * kRowStride + j] = values[s];
      }
      __syncthreads();
      constexpr int kWidth = Vector16<acc_t>::kWidth;
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        const acc_t* row = buffer + (s * kLanes + lane) * kRowStride;
        acc_t result = starts[s];
#pragma unroll
        for (int chunk = 0; chunk < (kMaxNumOut + kWidth - 1) / kWidth; ++chunk) {
          const Vector16<acc_t> entries = load_vector16(row + chunk * kWidth);
#pragma unroll
          for (int e = 0; e < kWidth; ++e) {
            if (chunk * kWidth + e < kMaxNumOut) {
              result = combine<kKind>(result, entries.values[e]);
            }
          }
        }
        results[s] = result;
      }
    } else {
      const int n = lanes();
      acc_t* buffer = buffers + kKind * num_out * n;
      buffer[j * n + lane] = values[0];
      __syncthreads();
      const acc_t* column = buffer + lane;
      acc_t result = starts[0];
#pragma unroll 1
      for (int k = 0; k < num_out; ++k) {  // model-loop: num_out
        result = combine<kKind>(result, column[k * n]);
      }
      results[0] = result;
    }
  }

 private:
  template <ExchangeKind kKind>
  static __device__ acc_t combine(acc_t a, acc_t b) {
    if constexpr (kKind == kMaxExchange) {
      return std::fmax(a, b);
    } else {
      return a + b;
    }
  }
};

// c_ij for each sample of the calling thread (lane, j) from its logits b_ij: the coupling
// step of routing_math.h (row maximum, shifted exponential, reciprocal of the row's sum in
// the order k = 0..J-1), with the rows met through the exchange. kLeaky: options.leaky,
// fixed at compile time (the leaky form's extra terms are then not in the common kernels).
template <bool kLeaky, typename acc_t, typename Tile, int kSamples>
__device__ __forceinline__ void exchange_couplings(
    const CapsuleExchange<acc_t, Tile>& exchange, int lane, int j, const acc_t (&logits)[kSamples],
    acc_t (&couplings)[kSamples]) {
  RoutingOptions options;
  options.leaky = kLeaky;
  acc_t starts[kSamples], row_max[kSamples];
  fill(starts, coupling_max_start<acc_t>(options));
  exchange.template reduce<kMaxExchange>(lane, j, logits, starts, row_max);
  acc_t shifted_exp[kSamples], total[kSamples];
#pragma unroll
  for (int s = 0; s < kSamples; ++s) {
    shifted_exp[s] = std::exp(logits[s] - row_max[s]);
    starts[s] = coupling_sum_start<acc_t>(options, kLeaky ? std::exp(-row_max[s]) : acc_t(0));
  }
  exchange.template reduce<kSumExchange>(lane, j, shifted_exp, starts, total);
#pragma unroll
  for (int s = 0; s < kSamples; ++s) {
    couplings[s] = coupling_from(shifted_exp[s], reciprocal(total[s]));
  }
}

// Per-thread D_out-vectors (one per sample) that a routing kernel keeps for its whole
// chunk but uses once per input. Generic tile: in registers. CapsNet tile: in shared
// memory after the exchange's buffers (thread_row_elements: vector v of sample s of every
// thread side by side, so a warp's 16-byte loads are one contiguous line, free of bank
// conflicts), so that the hot loop's registers go to the predictions. `kind` numbers the
// kinds of vectors a kernel keeps there.
template <typename acc_t, typename Tile>
struct ThreadRows {
  static constexpr bool kInRegisters = Tile::kLanes == 0;
  static constexpr int kSamples = samples_per_thread<Tile>(int(sizeof(acc_t)));
  static constexpr int kDim = Tile::kMaxDimOut;
  static constexpr int kWidth = Vector16<acc_t>::kWidth;
  static constexpr int kKept = kInRegisters ? kDim : 1;  // the registers' extent
  acc_t* first;  // this thread's vector 0 of sample 0
  int stride;    // between consecutive vectors of the thread: threads * kWidth

  __device__ ThreadRows(acc_t* all_rows, int kind, int thread, int threads)
      : first(all_rows + kind * kSamples * kDim * threads + thread * kWidth), stride(threads * kWidth) {}

  __device__ acc_t* vector(int s, int v) const { return first + (s * (kDim / kWidth) + v) * stride; }

  // Stores `values` where the rows live: `registers` (kInRegisters) or shared memory.
  __device__ void keep(const acc_t (&values)[kSamples][kDim], acc_t (&registers)[kSamples][kKept]) const {
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      if constexpr (kInRegisters) {
#pragma unroll
        for (int d = 0; d < kDim; ++d) {
          registers[s][d] = values[s][d];
        }
      } else {
#pragma unroll
        for (int v = 0; v < kDim / kWidth; ++v) {
          Vector16<acc_t> chunk;
#pragma unroll
          for (int e = 0; e < kWidth; ++e) {
            chunk.values[e] = values[s][v * kWidth + e];
          }
          store_vector16(chunk, vector(s, v));
        }
      }
    }
  }

  // The row of sample s.
  __device__ void load(const acc_t (&registers)[kSamples][kKept], int s, acc_t (&values)[kDim]) const {
    if constexpr (kInRegisters) {
#pragma unroll
      for (int d = 0; d < kDim; ++d) {
        values[d] = registers[s][d];
      }
    } else {
#pragma unroll
      for (int v = 0; v < kDim / kWidth; ++v) {
        const Vector16<acc_t> chunk = load_vector16(vector(s, v));
#pragma unroll
        for (int e = 0; e < kWidth; ++e) {
          values[v * kWidth + e] = chunk.values[e];
        }
      }
    }
  }

  // <other, row of sample s> over the first `count` components, in order, with fused
  // multiply-adds.
  __device__ acc_t dot(const acc_t (&other)[kDim], const acc_t (&registers)[kSamples][kKept], int s, int count) const {
    if constexpr (kInRegisters) {
      return capsnet::cuda::dot<Tile::kExactDimOut>(other, registers[s], count);
    } else {
      acc_t values[kDim];
      load(registers, s, values);
      return capsnet::cuda::dot<Tile::kExactDimOut>(other, values, count);
    }
  }
};

// The routing logit of iteration k for sample s of a thread: b_k[i, j] = <u_hat[j|i], V_k[j]>
// + prior[i, j] (b_{k+1} = b_k + <u_hat, v_k> summed up: V_k = v_0 + ... + v_{k-1}), with
// V_k in ThreadRows. The forward and the backward both compute the logits here.
template <typename acc_t, typename Tile, int kSamples, int kKept>
__device__ __forceinline__ acc_t routing_logit(
    const acc_t (&u_hat)[Tile::kMaxDimOut], const ThreadRows<acc_t, Tile>& agreement, const acc_t (&registers)[kSamples][kKept],
    int s, int count, acc_t prior) {
  return agreement.dot(u_hat, registers, s, count) + prior;
}

// ---------------------------------------------------------------------------------------
// Where a routing-kernel thread works: samples b[s] = blockIdx.x * samples_per_block +
// s * lanes + lane (s < kSamples), output capsule j = threadIdx.y, input capsules
// [i_begin, i_begin + inputs) = chunk blockIdx.y. Samples past the batch stay in the block (their
// thread must reach every barrier) but read sample B-1's rows and write nothing.
// ---------------------------------------------------------------------------------------
template <typename Tile, int kSamples>
struct RoutingThread {
  int lane;
  int j;
  int tile;
  int b[kSamples];       // 32-bit: the planner keeps B below 2^31
  int read_b[kSamples];  // b, or B-1 past the batch: the sample whose rows are read
  bool active[kSamples];
  int chunk;
  int i_begin;
  int inputs;  // in the chunk

  __device__ static RoutingThread locate(const RoutingGeometry& g) {
    RoutingThread t;
    t.lane = threadIdx.x;
    t.j = threadIdx.y;
    t.tile = blockIdx.x;
    const int lanes = Tile::kLanes > 0 ? Tile::kLanes : g.part.lanes;
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      t.b[s] = int(blockIdx.x) * g.part.samples_per_block + s * lanes + t.lane;
      t.active[s] = t.b[s] < g.shape.batch;
      t.read_b[s] = t.active[s] ? t.b[s] : int(g.shape.batch) - 1;
    }
    t.chunk = blockIdx.y;
    t.i_begin = int(t.chunk * g.part.inputs_per_chunk);
    t.inputs = int(smaller(g.part.inputs_per_chunk, g.shape.num_in - t.i_begin));
    return t;
  }

  __device__ int flat() const { return int(threadIdx.y * blockDim.x + threadIdx.x); }
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
