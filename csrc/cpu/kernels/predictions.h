// The predictions u_hat[j|i] = W[i, j] u[i] (Eq. 2) of the few samples of a task, block by
// block, in one sweep over W; optionally with the first iteration's weighted sums, taken
// while each block of predictions is still in cache.
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/memory.h"
#include "cpu/kernels/routing_steps.h"
#include "cpu/kernels/vec.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// Samples whose predictions share one sweep over W (5.9 MB for CapsNet): each vector of W
// loaded is used for all of them. Four: fewer sweep W too often, more leave too few
// registers for the tile below (measured on AVX2 and AVX-512).
constexpr int64_t kSamplesPerTask = 4;
// But no more than fit this much memory with their predictions (a task holds them all): a
// shape such as 3872 x 196 capsules has 48 MB of predictions per sample.
constexpr int64_t kTaskPredictionBytes = int64_t(64) << 20;

// Samples per task for a shape: a function of the shape alone, and the predictions of a
// sample do not depend on it (each is the same chain of multiply-adds in any tile).
template <typename T>
int64_t samples_per_task(const RoutingShape& shape) {
  const int64_t per_sample =
      num_capsule_blocks(shape.num_in, capsule_block<T>()) * shape.out_size() * capsule_block<T>() * int64_t(sizeof(T));
  const int64_t fitting = kTaskPredictionBytes / per_sample;
  return fitting < 1 ? 1 : (fitting > kSamplesPerTask ? kSamplesPerTask : fitting);
}

// Rows k of u_hat computed at once per sample, for kCount samples: kCount * rows
// accumulators, and kCount vectors of u, live in registers.
constexpr int64_t largest_power_of_two_at_most(int64_t n) {
  int64_t p = 1;
  while (2 * p <= n) {
    p *= 2;
  }
  return p;
}
template <int kCount>
constexpr int64_t kPredictionRows = largest_power_of_two_at_most((kVectorRegisters - kCount - 2) / kCount);

// D_in as a compile-time constant for the CapsNet shape (8), so that the sum over it is
// unrolled; 0 = known at run time only.
template <int kDimIn>
C10_ALWAYS_INLINE int64_t dim_in_of(const RoutingShape& shape) {
  return kDimIn > 0 ? kDimIn : shape.dim_in;
}

// What the forward adds to the predictions: the first iteration's weighted sums,
//   lane_sums[n][k, :] += c_0[j, q] * u_hat[n][k, q]   over the vectors q of every block,
// taken while each prediction is still in a register. c_0 is the same for every sample
// (its logits are the prior's); without a prior it is the uniform coupling, a constant
// factor applied when the lanes are summed (FirstSums::kPlain).
enum class FirstSums { kNone, kPlain, kWeighted };

template <typename T>
struct FirstIteration {
  const T* couplings;  // c_0 [blocks, N_out, L] (kWeighted), or null (kPlain)
  T* lane_sums;        // [kSamplesPerTask, N_out*D_out, kLanes]
};

// u_hat[n][k, :] = sum_e W[k, e, :] u[n][e, :] (e in order) for the kRows rows k0.. from
// W_k [kRows, D_in, L] and u[n] [D_in, L] (one vector each, at the vector's offset), into
// u_hat[n] [kRows, L]: kCount x kRows accumulators in registers. With kFirst, also the
// first iteration's sums of those rows (lane_sums[n] at row k0; c0_rows[r]: c_0 of row
// k0 + r at the vector).
template <typename T, int kDimIn, int kCount, int64_t kRows, FirstSums kFirst>
C10_ALWAYS_INLINE void predict_rows(
    const T* W_k, const T* const* u, T* const* u_hat, int64_t dim_in, T* const* lane_sums, const T* const* c0_rows) {
  using Vt = Vec<T>;
  constexpr int64_t kBlock = capsule_block<T>();
  constexpr int64_t kL = kLanes<T>;
  Vt acc[kCount][kRows];
#pragma GCC unroll 16
  for (int n = 0; n < kCount; ++n) {
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      acc[n][r] = Vt(T(0));
    }
  }
#pragma GCC unroll 16
  for (int64_t e = 0; e < dim_in; ++e) {
    Vt x[kCount];
#pragma GCC unroll 16
    for (int n = 0; n < kCount; ++n) {
      x[n] = in_register(Vt::load(u[n] + e * kBlock));
    }
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      const Vt w = in_register(Vt::load(W_k + (r * dim_in + e) * kBlock));
#pragma GCC unroll 16
      for (int n = 0; n < kCount; ++n) {
        acc[n][r] = fma(w, x[n], acc[n][r]);
      }
    }
  }
#pragma GCC unroll 16
  for (int n = 0; n < kCount; ++n) {
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      acc[n][r].store(u_hat[n] + r * kBlock);
      if constexpr (kFirst != FirstSums::kNone) {
        T* sums = lane_sums[n] + r * kL;
        if constexpr (kFirst == FirstSums::kPlain) {
          (Vt::load(sums) + acc[n][r]).store(sums);
        } else {
          fma(Vt::load(c0_rows[r]), acc[n][r], Vt::load(sums)).store(sums);
        }
      }
    }
  }
}

// Rows k.. k + kRows of one block, and within them the block's vectors q, so that the
// rows' slice of W (kRows * D_in * L elements) is loaded from memory once and then read
// from L1 for every q.
template <typename T, int kDimIn, int kCount, int64_t kRows, FirstSums kFirst>
C10_ALWAYS_INLINE void predict_row_group(
    int64_t k, const T* W, const T* const* u_block, T* const* u_hat_block, const T* c0_block,
    T* const* first_lane_sums, const RoutingShape& shape, int64_t dim_in) {
  constexpr int64_t kBlock = capsule_block<T>();
  const T* c0_rows[kRows];
  T* lane_sums[kCount];
  if constexpr (kFirst != FirstSums::kNone) {
    for (int n = 0; n < kCount; ++n) {
      lane_sums[n] = first_lane_sums[n] + k * kLanes<T>;
    }
  }
  for (int64_t q = 0; q < kBlockVectors<T>; ++q) {
    const int64_t offset = q * kLanes<T>;
    const T* u[kCount];
    T* u_hat[kCount];
    for (int n = 0; n < kCount; ++n) {
      u[n] = u_block[n] + offset;
      u_hat[n] = u_hat_block[n] + k * kBlock + offset;
    }
    if constexpr (kFirst == FirstSums::kWeighted) {
      for (int64_t r = 0; r < kRows; ++r) {
        c0_rows[r] = c0_block + ((k + r) / shape.dim_out) * kBlock + offset;
      }
    }
    predict_rows<T, kDimIn, kCount, kRows, kFirst>(
        W + k * dim_in * kBlock + offset, u, u_hat, dim_in, lane_sums, c0_rows);
  }
}

template <typename T, int kDimIn, int kCount, FirstSums kFirst>
C10_ALWAYS_INLINE void predict_block(
    const T* W, const T* const* u_block, T* const* u_hat_block, const T* c0_block, T* const* first_lane_sums,
    const RoutingShape& shape) {
  const int64_t dim_in = dim_in_of<kDimIn>(shape);
  const int64_t out_size = shape.out_size();
  int64_t k = 0;
  for (; k + kPredictionRows<kCount> <= out_size; k += kPredictionRows<kCount>) {
    predict_row_group<T, kDimIn, kCount, kPredictionRows<kCount>, kFirst>(
        k, W, u_block, u_hat_block, c0_block, first_lane_sums, shape, dim_in);
  }
  for (; k < out_size; ++k) {
    predict_row_group<T, kDimIn, kCount, 1, kFirst>(
        k, W, u_block, u_hat_block, c0_block, first_lane_sums, shape, dim_in);
  }
}

// predict_block for a run-time count of samples, 1 .. kMaxCount, and a run-time FirstSums.
template <typename T, int kDimIn, int kMaxCount>
C10_ALWAYS_INLINE void predict_block_of(
    int64_t count, FirstSums first, const T* W, const T* const* u, T* const* u_hat, const T* c0_block,
    T* const* first_lane_sums, const RoutingShape& shape) {
  if constexpr (kMaxCount > 1) {
    if (count < kMaxCount) {
      predict_block_of<T, kDimIn, kMaxCount - 1>(count, first, W, u, u_hat, c0_block, first_lane_sums, shape);
      return;
    }
  }
  switch (first) {
    case FirstSums::kNone:
      predict_block<T, kDimIn, kMaxCount, FirstSums::kNone>(W, u, u_hat, c0_block, first_lane_sums, shape);
      return;
    case FirstSums::kPlain:
      predict_block<T, kDimIn, kMaxCount, FirstSums::kPlain>(W, u, u_hat, c0_block, first_lane_sums, shape);
      return;
    case FirstSums::kWeighted:
      predict_block<T, kDimIn, kMaxCount, FirstSums::kWeighted>(W, u, u_hat, c0_block, first_lane_sums, shape);
      return;
  }
}

// u_hat [blocks, N_out*D_out, L] of samples [begin, end) (at most kSamplesPerTask) into
// u_hat + (b - begin) * per_sample; with `first`, also its weighted sums. u_gathered:
// scratch for kSamplesPerTask * D_in * L elements.
template <typename T, int kDimIn>
void predict_samples(
    const T* u_blocked, const T* W_blocked, int64_t begin, int64_t end, T* u_hat, int64_t per_sample,
    T* u_gathered, const RoutingShape& shape, const FirstIteration<T>* first = nullptr) {
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t dim_in = dim_in_of<kDimIn>(shape);
  const int64_t blocks = num_capsule_blocks(shape.num_in, kBlock);
  const int64_t out_size = shape.out_size();
  const int64_t block_W = out_size * dim_in * kBlock;
  const int64_t block_u = dim_in * kBlock;
  const int64_t block_u_hat = out_size * kBlock;
  const int64_t count = end - begin;
  const FirstSums sums =
      first == nullptr ? FirstSums::kNone : (first->couplings != nullptr ? FirstSums::kWeighted : FirstSums::kPlain);
  T* lane_sums[kSamplesPerTask] = {};
  for (int64_t n = 0; n < count && first != nullptr; ++n) {
    lane_sums[n] = first->lane_sums + n * out_size * kLanes<T>;
  }
  for (int64_t block = 0; block < blocks; ++block) {
    const T* u[kSamplesPerTask];
    T* out[kSamplesPerTask];
    for (int64_t n = 0; n < count; ++n) {
      // The samples' inputs side by side: in u_blocked they are a multiple of 4 KB apart
      // for many shapes, and such loads compete for the same L1 sets.
      copy(u_blocked + ((begin + n) * blocks + block) * block_u, block_u, u_gathered + n * block_u);
      u[n] = u_gathered + n * block_u;
      out[n] = u_hat + n * per_sample + block * block_u_hat;
    }
    const T* c0_block = sums == FirstSums::kWeighted ? first->couplings + block * shape.num_out * kBlock : nullptr;
    predict_block_of<T, kDimIn, kSamplesPerTask>(
        count, sums, W_blocked + block * block_W, u, out, c0_block, lane_sums, shape);
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
