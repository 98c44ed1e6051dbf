// The routing op on the CPU emulation of CUDA, for the tests (tests/test_cuda_emulated.py
// builds this with torch.utils.cpp_extension.load; it is not part of capsnet._C).
//
// It runs the CUDA build's own code: the kernels of csrc/cuda/routing_kernel.cuh, and the
// host code of csrc/cuda/routing_host.h (checks, launch plan, launch order) that the CUDA
// launcher runs, with a launcher that hands each kernel to simt instead of <<<>>>. Tensors
// live on the CPU; outputs and workspaces start as NaN so that unwritten elements show.
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "simt.h"
// After simt.h: the kernels compile against the emulated CUDA built-ins.
#include "cuda/routing_host.h"

namespace {

using capsnet::cuda::DeviceLimits;
using capsnet::cuda::HostOptions;
using capsnet::cuda::KernelLaunch;
using capsnet::cuda::KernelRef;
using capsnet::cuda::LaunchDims;

dim3 to_dim3(const LaunchDims& dims) {
  return dim3(dims.x, dims.y, dims.z);
}

struct EmulatedLauncher {
  simt::LaunchOptions options;

  template <typename Params>
  void operator()(KernelRef<Params> kernel, const KernelLaunch& config, const Params& params) const {
    simt::launch(
        kernel.name, to_dim3(config.grid), to_dim3(config.block), config.shared_bytes, options,
        [&] { kernel.function(params); });
  }
};

// An H100's limits, except for the number of SMs, which tests vary to change the plan.
HostOptions emulated_host(int64_t multiprocessor_count) {
  DeviceLimits limits = capsnet::cuda::kH100Limits;
  limits.multiprocessor_count = multiprocessor_count;
  return HostOptions{c10::DeviceType::CPU, limits, /*poison_memory=*/true};
}

EmulatedLauncher emulated_launcher(const HostOptions& host, const std::string& schedule, uint64_t seed) {
  simt::LaunchOptions options;
  options.schedule = simt::parse_schedule(schedule);
  options.seed = seed;
  options.max_threads_per_block = host.limits.max_threads_per_block;
  options.max_shared_bytes = host.limits.max_shared_bytes_per_block;
  return EmulatedLauncher{options};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_forward(
    const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& bias, int64_t num_iterations,
    const std::string& schedule, uint64_t seed, int64_t multiprocessor_count) {
  const HostOptions host = emulated_host(multiprocessor_count);
  capsnet::cuda::check_forward_arguments(u, W, bias, num_iterations, host);
  return capsnet::cuda::routing_forward_host(u, W, bias, num_iterations, host, emulated_launcher(host, schedule, seed));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W, const at::Tensor& s_saved,
    const at::Tensor& couplings, const std::string& schedule, uint64_t seed, int64_t multiprocessor_count) {
  const HostOptions host = emulated_host(multiprocessor_count);
  capsnet::cuda::check_backward_arguments(grad_v, u, W, s_saved, couplings, host);
  return capsnet::cuda::routing_backward_host(
      grad_v, u, W, s_saved, couplings, host, emulated_launcher(host, schedule, seed));
}

// The launch plan for a shape, for tests that check which tile class and partition they cover.
pybind11::dict describe_plan(
    int64_t batch, int64_t num_in, int64_t num_out, int64_t dim_out, int64_t dim_in, int64_t num_iterations,
    int64_t scalar_bytes, int64_t multiprocessor_count) {
  const HostOptions host = emulated_host(multiprocessor_count);
  const capsnet::cuda::RoutingPlan plan = capsnet::cuda::plan_routing(
      batch, num_in, num_out, dim_out, dim_in, num_iterations, scalar_bytes, host.limits);
  pybind11::dict out;
  out["tile"] = capsnet::cuda::tile_name(plan.tile);
  out["samples_per_block"] = plan.sizes.samples_per_block;
  out["coupling_run"] = plan.sizes.coupling_run;
  out["inputs_per_chunk"] = plan.sizes.inputs_per_chunk;
  out["num_chunks"] = plan.sizes.num_chunks;
  out["grad_weight_inputs"] = plan.grad_weight_inputs;
  out["grad_input_slice"] = plan.grad_input_slice;
  out["forward_workspace_elements"] = plan.partials_numel;
  out["backward_workspace_elements"] = plan.partials_numel + 2 * plan.per_iteration_numel + plan.logit_grad_numel;
  out["forward_shared_bytes"] = plan.forward_partial_sums.shared_bytes;
  out["grad_input_shared_bytes"] = plan.grad_input.shared_bytes;
  return out;
}

}  // namespace

void register_simt_selftests(pybind11::module_& m);  // simt_selftest.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "capsnet routing kernels run on the CPU emulation of CUDA (csrc/simt), for tests";
  namespace py = pybind11;
  m.def("routing_forward", &emulated_forward, py::arg("u"), py::arg("W"), py::arg("bias"),
      py::arg("num_iterations"), py::arg("schedule") = "ascending", py::arg("seed") = 0,
      py::arg("multiprocessor_count") = capsnet::cuda::kH100Limits.multiprocessor_count);
  m.def("routing_backward", &emulated_backward, py::arg("grad_v"), py::arg("u"), py::arg("W"), py::arg("s_saved"),
      py::arg("couplings"), py::arg("schedule") = "ascending", py::arg("seed") = 0,
      py::arg("multiprocessor_count") = capsnet::cuda::kH100Limits.multiprocessor_count);
  m.def("describe_plan", &describe_plan, py::arg("batch"), py::arg("num_in"), py::arg("num_out"),
      py::arg("dim_out"), py::arg("dim_in"), py::arg("num_iterations"), py::arg("scalar_bytes"),
      py::arg("multiprocessor_count") = capsnet::cuda::kH100Limits.multiprocessor_count);
  m.def("launch_log", [] { return simt::launch_log(); }, "kernel names launched since clear_launch_log()");
  m.def("clear_launch_log", &simt::clear_launch_log);
  register_simt_selftests(m);
}
