// The checks and tensors of one input_loop call, shared by the GPU binding (binding.cpp) and
// the emulated one (emulated_input_loop.cpp).
#pragma once

#include <torch/extension.h>

#include "input_loop.h"

namespace capsnet::cuda::staging_experiment {

struct ProblemTensors {
  torch::Tensor u, W, partials;  // contiguous inputs (kept alive for the launch), output
  LoopProblem problem;
};

// partials [chunks, B, J, 16] for u [B, N_in, 8] and W [N_in, J <= 10, 16, 8], float32.
inline ProblemTensors problem_tensors(const torch::Tensor& u, const torch::Tensor& W, int64_t inputs_per_chunk,
                                      int64_t stages) {
  TORCH_CHECK(u.device() == W.device(), "input_loop: u and W must be on one device, got ", u.device(), " and ", W.device());
  TORCH_CHECK(u.scalar_type() == torch::kFloat && W.scalar_type() == torch::kFloat, "input_loop: u and W must be float32");
  TORCH_CHECK(u.dim() == 3 && u.size(2) == 8 && u.size(0) >= 1, "input_loop: u must be [B >= 1, N_in, 8], got ", u.sizes());
  TORCH_CHECK(W.dim() == 4 && W.size(0) == u.size(1) && W.size(1) >= 1 && W.size(1) <= 10 && W.size(2) == 16 && W.size(3) == 8,
              "input_loop: W must be [N_in, 1 <= N_out <= 10, 16, 8] with u's N_in, got ", W.sizes());
  TORCH_CHECK(inputs_per_chunk >= 1, "input_loop: inputs_per_chunk must be >= 1, got ", inputs_per_chunk);
  TORCH_CHECK(stages == 0 || (stages >= 2 && stages <= 4), "input_loop: stages must be 0, 2, 3 or 4, got ", stages);
  ProblemTensors t;
  t.u = u.contiguous();
  t.W = W.contiguous();
  const int64_t chunks = (u.size(1) + inputs_per_chunk - 1) / inputs_per_chunk;
  t.partials = torch::empty({chunks, u.size(0), W.size(1), 16}, u.options());
  t.problem = LoopProblem{t.u.data_ptr<float>(), t.W.data_ptr<float>(), t.partials.data_ptr<float>(),
                          int(u.size(0)), int(u.size(1)), int(W.size(1)), int(inputs_per_chunk)};
  return t;
}

}  // namespace capsnet::cuda::staging_experiment
