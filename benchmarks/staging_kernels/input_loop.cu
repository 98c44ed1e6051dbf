// The staging experiment's launches (kernels: input_loop.cuh), compiled by nvcc.
#include "input_loop.cuh"
#include "input_loop_launch.h"

namespace capsnet::cuda::staging_experiment {

cudaError_t launch_input_loop(const LoopProblem& p, int stages, cudaStream_t stream) {
  const dim3 grid = loop_grid(p);
  const dim3 block = loop_block(p);
  const size_t shared = shared_bytes(stages, p.num_out);
  switch (stages) {
    case 0: input_loop_kernel<0><<<grid, block, 0, stream>>>(p); break;
    case 2: input_loop_kernel<2><<<grid, block, shared, stream>>>(p); break;
    case 3: input_loop_kernel<3><<<grid, block, shared, stream>>>(p); break;
    case 4: input_loop_kernel<4><<<grid, block, shared, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace capsnet::cuda::staging_experiment
