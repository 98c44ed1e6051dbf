// The staging experiment's problem description, shared by the kernels (input_loop.cuh),
// their launches (input_loop.cu, emulated_input_loop.cpp) and the binding (binding.cpp).
#pragma once

namespace capsnet::cuda::staging_experiment {

// float32, CapsNet tile (D_in = 8, D_out = 16, J <= 10); contiguous tensors.
struct LoopProblem {
  const float* u;   // [B, I, 8]
  const float* W;   // [I, J, 16, 8]
  float* partials;  // [chunks, B, J, 16] output
  int batch;
  int num_in;
  int num_out;
  int inputs_per_chunk;
};


}  // namespace capsnet::cuda::staging_experiment
