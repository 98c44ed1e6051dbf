// The per-task working memory of the kernels, carved out of one buffer that the driver
// allocates per thread (the kernels allocate nothing themselves).
#pragma once

#include <cstdint>

#include "cpu/kernel_interface.h"
#include "cpu/kernels/memory.h"
#include "cpu/kernels/predictions.h"
#include "cpu/kernels/vec.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

// Backward phase 2 (backward_block.h): samples per update of grad W, and rows of grad
// u_hat rebuilt per step (with the matching rows of W and grad W they fit in L1).
constexpr int64_t kGradSamples = 8;
constexpr int64_t kRowChunk = 16;

// Hands out consecutive pieces of a buffer, each starting on a 64-byte boundary (the
// buffer itself is 64-byte aligned). With a null base it only counts.
template <typename T>
class Carver {
 public:
  explicit Carver(T* base) : base_(base) {}
  T* take(int64_t count) {
    constexpr int64_t kAlign = 64 / static_cast<int64_t>(sizeof(T));
    T* piece = base_ == nullptr ? nullptr : base_ + used_;
    used_ += (count + kAlign - 1) / kAlign * kAlign;
    return piece;
  }
  int64_t used() const { return used_; }

 private:
  T* base_;
  int64_t used_ = 0;
};

// Forward and backward phase 1, per task of up to kSamplesPerTask samples.
template <typename T>
struct SampleWorkspace {
  int64_t u_hat_per_sample;  // [blocks, N_out*D_out, L]
  T* u_hat;                  // [samples_per_task, u_hat_per_sample]
  T* u_gathered;             // [kSamplesPerTask, D_in, L]: one block of the task's inputs
  T* first_couplings;        // [blocks, N_out, L]: c_0 when there is a prior
  T* first_lane_sums;        // [kSamplesPerTask, N_out*D_out, kLanes]: the first iteration's
  T* lane_sums;              // [N_out*D_out, kLanes]: sums over blocks, one per lane
  T* couplings;              // [N_out, L] of one block
  T* grad_couplings;         // [N_out, L] of one block
  T* V;                      // [N_out*D_out] running sum of outputs (forward; scratch in backward)
  T* v;                      // [N_out*D_out]
  T* outputs;                // [r, N_out*D_out]  v_t         (backward)
  T* sums;                   // [r, N_out*D_out]  V_t         (backward)
  T* grad_s;                 // [N_out*D_out]
  T* grad_v;                 // [N_out*D_out]
  int64_t size;

  SampleWorkspace(T* base, const RoutingShape& shape) {
    constexpr int64_t kBlock = capsule_block<T>();
    const int64_t out_size = shape.out_size();
    // Padded by 17 cache lines so that the samples' predictions do not start a multiple of
    // 4 KB apart (which would put the streams of the samples of a task in the same L1 sets).
    u_hat_per_sample = num_capsule_blocks(shape.num_in, kBlock) * out_size * kBlock + 17 * 64 / int64_t(sizeof(T));
    Carver<T> carve(base);
    u_hat = carve.take(samples_per_task<T>(shape) * u_hat_per_sample);
    u_gathered = carve.take(kSamplesPerTask * shape.dim_in * kBlock);
    first_couplings = carve.take(num_capsule_blocks(shape.num_in, kBlock) * shape.num_out * kBlock);
    first_lane_sums = carve.take(kSamplesPerTask * out_size * kLanes<T>);
    lane_sums = carve.take(out_size * kLanes<T>);
    couplings = carve.take(shape.num_out * kBlock);
    grad_couplings = carve.take(shape.num_out * kBlock);
    V = carve.take(out_size);
    v = carve.take(out_size);
    outputs = carve.take(shape.iterations * out_size);
    sums = carve.take(shape.iterations * out_size);
    grad_s = carve.take(out_size);
    grad_v = carve.take(out_size);
    size = carve.used();
  }
};

// Backward phase 2, per task (one block of input capsules).
template <typename T>
struct BlockWorkspace {
  T* grad_W;      // [N_out*D_out, D_in, L]: the block's grad W summed over the chunk
  T* grad_u_hat;  // [kGradSamples, kRowChunk, L]: a chunk of rows
  T* grad_u;      // [kGradSamples, D_in, L]
  T* grad_prior;  // [N_out, L]
  int64_t size;

  BlockWorkspace(T* base, const RoutingShape& shape) {
    constexpr int64_t kBlock = capsule_block<T>();
    Carver<T> carve(base);
    grad_W = carve.take(shape.out_size() * shape.dim_in * kBlock);
    grad_u_hat = carve.take(kGradSamples * kRowChunk * kBlock);
    grad_u = carve.take(kGradSamples * shape.dim_in * kBlock);
    grad_prior = carve.take(shape.num_out * kBlock);
    size = carve.used();
  }
};

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
