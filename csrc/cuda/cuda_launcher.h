// The CUDA Launcher of routing_launches.h: runs one kernel on one stream and checks the
// launch.
//
// Without ATen, like routing_launches.h: the launch_*.cu files instantiate the launches of
// one scalar type and direction each with it (routing_instances.h). The chunk trees'
// counters, which need tensors, are routing_kernel.cu's.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "routing_launches.h"

namespace at {
class Tensor;
}

namespace capsnet::cuda {

// A launch failed: it may have stopped inside a chunk tree, so the counters kept for this
// stream of the current device are not known to be zero (routing_kernel.cu).
void forget_tree_counters(cudaStream_t stream);

inline dim3 to_dim3(const LaunchDims& dims) {
  return dim3(dims.x, dims.y, dims.z);
}

struct CudaLauncher {
  // Dynamic shared memory a block gets without cudaFuncAttributeMaxDynamicSharedMemorySize.
  static constexpr size_t kDefaultSharedBytesPerBlock = 48 * 1024;
  cudaStream_t stream;

  template <typename Params>
  void operator()(KernelRef<Params> kernel, const KernelLaunch& config, const Params& params) const {
    const int64_t threads = int64_t(config.block.x) * config.block.y * config.block.z;
    TORCH_CHECK(threads <= kernel.launch_bound, "capsnet: internal error: ", kernel.name, " launched with ",
        threads, " threads per block, above its __launch_bounds__ of ", kernel.launch_bound);
    if (config.shared_bytes > kDefaultSharedBytesPerBlock) {
      // The opt-in for more (the planner stays within the device's opt-in limit).
      C10_CUDA_CHECK(cudaFuncSetAttribute(
          kernel.function, cudaFuncAttributeMaxDynamicSharedMemorySize, int(config.shared_bytes)));
    }
    kernel.function<<<to_dim3(config.grid), to_dim3(config.block), config.shared_bytes, stream>>>(params);
    const cudaError_t launched = cudaGetLastError();
    if (launched != cudaSuccess) {
      forget_tree_counters(stream);
      C10_CUDA_CHECK(launched);
    }
  }

  // At least `numel` zeroed int32 counters on like's device, in this stream's order
  // (routing_kernel.cu).
  at::Tensor tree_counters(int64_t numel, const at::Tensor& like) const;
};

}  // namespace capsnet::cuda
