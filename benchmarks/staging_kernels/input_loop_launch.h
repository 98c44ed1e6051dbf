// The staging experiment's launch on a GPU (input_loop.cu), as binding.cpp calls it.
#pragma once

#include <cuda_runtime_api.h>

#include "input_loop.h"

namespace capsnet::cuda::staging_experiment {

// stages: 0 (loads where they are used) or 2, 3, 4 (the ring's slots); cudaErrorInvalidValue
// for any other.
cudaError_t launch_input_loop(const LoopProblem& problem, int stages, cudaStream_t stream);

}  // namespace capsnet::cuda::staging_experiment
