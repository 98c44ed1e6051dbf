// The staging experiment's kernels on the CPU emulator (csrc/simt), for
// tests/test_gpu_experiments.py: the staged loop must give the direct loop's sums bit for
// bit under every thread order, on any machine.
#include <torch/extension.h>

#include <string>

#include "simt.h"
// After simt.h: the kernels as nvcc compiles them, with the emulator's vocabulary.
#include "input_loop.cuh"
#include "problem_tensors.h"

namespace {

namespace experiment = capsnet::cuda::staging_experiment;

torch::Tensor input_loop(const torch::Tensor& u, const torch::Tensor& W, int64_t inputs_per_chunk, int64_t stages,
                         const std::string& schedule, uint64_t seed) {
  TORCH_CHECK(u.is_cpu(), "input_loop (emulated): u and W must be CPU tensors, got ", u.device());
  experiment::ProblemTensors t = experiment::problem_tensors(u, W, inputs_per_chunk, stages);
  simt::LaunchOptions options;
  options.schedule = simt::parse_schedule(schedule);
  options.seed = seed;
  const experiment::LoopProblem& p = t.problem;
  experiment::with_stages(int(stages), [&](auto count) {
    simt::launch("input_loop_kernel", experiment::loop_grid(p), experiment::loop_block(p),
                 experiment::shared_bytes(int(stages), p.num_out), options,
                 [&] { experiment::input_loop_kernel<decltype(count)::value>(p); }, experiment::Tile::kMaxThreads);
  });
  return t.partials;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("input_loop", &input_loop, "the staging experiment's input loop on the CPU emulator");
}
