// The staging experiment's launches (kernels: input_loop.cuh), compiled by nvcc.
#include "input_loop.cuh"
#include "input_loop_launch.h"

namespace capsnet::cuda::staging_experiment {

cudaError_t launch_input_loop(const LoopProblem& p, int stages, cudaStream_t stream) {
  const dim3 grid = loop_grid(p);
  const dim3 block = loop_block(p);
  const size_t shared = shared_bytes(stages, p.num_out);
  const bool known = with_stages(stages, [&](auto count) {
    input_loop_kernel<decltype(count)::value><<<grid, block, shared, stream>>>(p);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace capsnet::cuda::staging_experiment
