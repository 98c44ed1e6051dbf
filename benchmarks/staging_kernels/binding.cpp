// Python binding of the staging experiment's kernels on a GPU (benchmarks/staging_experiment.py).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "input_loop_launch.h"
#include "problem_tensors.h"

namespace {

namespace experiment = capsnet::cuda::staging_experiment;

// partials [chunks, B, J, 16]: each chunk's sum over its inputs of W[i, j] u[b, i].
torch::Tensor input_loop(const torch::Tensor& u, const torch::Tensor& W, int64_t inputs_per_chunk, int64_t stages) {
  TORCH_CHECK(u.is_cuda(), "input_loop: u and W must be CUDA tensors, got ", u.device());
  experiment::ProblemTensors t = experiment::problem_tensors(u, W, inputs_per_chunk, stages);
  const cudaError_t status = experiment::launch_input_loop(t.problem, int(stages), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "input_loop: launch failed: ", cudaGetErrorString(status));
  return t.partials;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("input_loop", &input_loop, "one routing input loop (stages 0: direct loads; 2-4: staged in shared memory)");
}
