// The routing op on the CPU emulation of CUDA, for the tests (tests/test_cuda_emulated.py
// builds this with torch.utils.cpp_extension.load; it is not part of capsnet._C).
//
// It runs the CUDA build's own code: the kernels of csrc/cuda/routing_forward.cuh and
// routing_backward.cuh, and the
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
#include "cuda/tree_counters.h"

namespace {

using capsnet::cuda::DeviceLimits;
using capsnet::cuda::HostOptions;
using capsnet::cuda::KernelLaunch;
using capsnet::cuda::KernelRef;
using capsnet::cuda::LaunchDims;

dim3 to_dim3(const LaunchDims& dims) {
  return dim3(dims.x, dims.y, dims.z);
}

// The chunk trees' counters kept between calls, as the CUDA launcher keeps one buffer per
// stream (the emulator has one stream).
capsnet::cuda::TreeCounterCache& kept_tree_counters() {
  static capsnet::cuda::TreeCounterCache cache;
  return cache;
}
constexpr const void* kEmulatedStream = nullptr;

struct EmulatedLauncher {
  simt::LaunchOptions options;

  template <typename Params>
  void operator()(KernelRef<Params> kernel, const KernelLaunch& config, const Params& params) const {
    try {
      simt::launch(
          kernel.name, to_dim3(config.grid), to_dim3(config.block), config.shared_bytes, options,
          [&] { kernel.function(params); }, kernel.launch_bound);
    } catch (...) {
      kept_tree_counters().drop(kEmulatedStream, -1);  // it may have stopped inside a tree
      throw;
    }
  }

  at::Tensor tree_counters(int64_t numel, const at::Tensor& like) const {
    return kept_tree_counters().take(kEmulatedStream, like.options(), numel, [](at::Tensor& tensor) {
      simt::log_operation("cudaMemsetAsync");
      tensor.zero_();
    });
  }
};

// An H100's limits, except for the number of SMs, which tests vary to change the plan.
HostOptions emulated_host(int64_t multiprocessor_count) {
  DeviceLimits limits = capsnet::cuda::kH100Limits;
  limits.multiprocessor_count = multiprocessor_count;
  HostOptions host{c10::DeviceType::CPU, limits, /*poison_memory=*/true};
  host.plan_choices = capsnet::cuda::plan_choices_from_environment();  // as the CUDA launcher
  return host;
}

EmulatedLauncher emulated_launcher(const HostOptions& host, const std::string& schedule, uint64_t seed) {
  simt::LaunchOptions options;
  options.schedule = simt::parse_schedule(schedule);
  options.seed = seed;
  options.max_threads_per_block = host.limits.max_threads_per_block;
  options.max_shared_bytes = host.limits.max_shared_bytes_per_block_optin;  // the CUDA launcher opts in
  return EmulatedLauncher{options};
}

// The chunk trees' counters after the last call (they must be back at zero).
at::Tensor last_counters;

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_forward(
    const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& logit_prior, int64_t num_iterations, bool leaky, bool detach_routing,
    bool return_couplings, const std::string& schedule, uint64_t seed, int64_t multiprocessor_count) {
  HostOptions host = emulated_host(multiprocessor_count);
  host.counters_out = &last_counters;
  return capsnet::cuda::routing_forward_host(
      u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings, host,
      emulated_launcher(host, schedule, seed));
}

// The backward's four gradients, and its coefficient workspace [slots, I, J, B] (the
// recomputed couplings c_m and logit gradients G_m; see BackwardTerms in routing_layout.h).
// max_coefficient_bytes: the bound of the coefficient workspace (0: the kernels' own),
// which tests make small to run the backward in slices of the batch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& logit_prior,
    const at::Tensor& s_saved, bool leaky, bool detach_routing, const std::string& schedule, uint64_t seed,
    int64_t multiprocessor_count, int64_t max_coefficient_bytes) {
  HostOptions host = emulated_host(multiprocessor_count);
  if (max_coefficient_bytes > 0) {
    host.max_coefficient_bytes = max_coefficient_bytes;
  }
  at::Tensor coefficients;
  host.coefficients_out = &coefficients;
  host.counters_out = &last_counters;
  auto [grad_u, grad_W, grad_bias, grad_prior] = capsnet::cuda::routing_backward_host(
      grad_v, u, W, logit_prior, s_saved, leaky, detach_routing, host, emulated_launcher(host, schedule, seed));
  return {grad_u, grad_W, grad_bias, grad_prior, coefficients.defined() ? coefficients : at::empty({0})};
}

pybind11::dict launch_dict(const capsnet::cuda::KernelLaunch& launch) {
  pybind11::dict out;
  out["grid"] = pybind11::make_tuple(launch.grid.x, launch.grid.y, launch.grid.z);
  out["block"] = pybind11::make_tuple(launch.block.x, launch.block.y, launch.block.z);
  out["shared_bytes"] = launch.shared_bytes;
  return out;
}

// The launch plan for a shape, for tests and for the static performance model
// (benchmarks/cuda_model.py). acc_bytes: 4 for float math (float32 storage, or with
// float32_storage=false float16/bfloat16), 8 for float64. async_copies=false plans for a
// GPU without cp.async (before sm_80); shared_bytes_per_multiprocessor for a GPU with less
// shared memory per SM than an H100 (e.g. 100 KiB: sm_86, sm_89).
pybind11::dict describe_plan(
    int64_t batch, int64_t num_in, int64_t num_out, int64_t dim_out, int64_t dim_in, int64_t num_iterations,
    int64_t acc_bytes, int64_t multiprocessor_count, bool has_prior, bool detach_routing, bool async_copies,
    bool float32_storage, int64_t shared_bytes_per_multiprocessor) {
  HostOptions host = emulated_host(multiprocessor_count);
  host.limits.async_copies = async_copies;
  host.limits.shared_bytes_per_multiprocessor = shared_bytes_per_multiprocessor;
  const at::ScalarType storage = acc_bytes == 8 ? at::kDouble : (float32_storage ? at::kFloat : at::kHalf);
  host.plan_choices = capsnet::cuda::plan_choices_for(host.plan_choices, storage);
  const capsnet::RoutingShape shape{batch, num_in, num_out, dim_out, dim_in, num_iterations};
  const capsnet::cuda::RoutingPlan plan =
      capsnet::cuda::plan_routing(shape, has_prior, detach_routing, acc_bytes, host.limits, host.plan_choices);
  const capsnet::cuda::RoutingPartition& part = plan.geometry.part;
  pybind11::dict out;
  out["tile"] = capsnet::cuda::tile_name(plan.tile);
  out["lanes"] = part.lanes;
  out["samples_per_block"] = part.samples_per_block;
  out["sample_tiles"] = part.sample_tiles;
  out["inputs_per_chunk"] = part.inputs_per_chunk;
  out["num_chunks"] = part.num_chunks;
  out["chunk_levels"] = part.chunk_levels;
  out["staging_slots"] = plan.staging_slots;
  out["sweep_staging_slots"] = plan.sweep_staging_slots;
  out["sample_groups"] = part.sample_groups;
  out["gradient_rows"] = plan.gradient_rows;
  out["gradient_loads_ahead"] = plan.gradient_loads_ahead;
  out["gradient_inputs_per_block"] = part.gradient_inputs_per_block;
  out["gradient_group_samples"] = part.gradient_group_samples;
  out["gradient_rounds"] = part.gradient_rounds;
  out["gradient_group_levels"] = part.gradient_group_levels;
  out["grad_input_slice"] = part.grad_input_slice;
  out["terms"] = part.terms;
  out["coefficient_slots"] = part.coefficient_slots;
  out["coefficient_batch"] = part.coefficient_batch;
  out["backward_slice_batch"] = capsnet::cuda::backward_slice_batch(shape, has_prior, detach_routing, acc_bytes);
  out["forward_workspace_elements"] = plan.partials_numel + plan.agreement_numel;
  out["backward_workspace_elements"] =
      plan.partials_numel + plan.agreement_numel + plan.terms_numel + plan.coefficients_numel;
  out["coefficient_elements"] = plan.coefficients_numel;
  pybind11::dict launches;
  launches["prior_coupling_kernel"] = launch_dict(plan.prior_coupling);
  launches["forward_iteration_kernel"] = launch_dict(plan.forward_iteration);
  launches["backward_sweep_kernel"] = launch_dict(plan.backward_sweep);
  launches["backward_output_kernel"] = launch_dict(plan.backward_output);
  launches["gradient_kernel"] = launch_dict(plan.gradients);
  launches["grad_weight_kernel"] = launch_dict(plan.grad_weight);
  launches["grad_input_kernel"] = launch_dict(plan.grad_input);
  out["launches"] = launches;
  return out;
}

}  // namespace

void register_simt_selftests(pybind11::module_& m);  // simt_selftest.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "capsnet routing kernels run on the CPU emulation of CUDA (csrc/simt), for tests";
  namespace py = pybind11;
  const int64_t h100_sms = capsnet::cuda::kH100Limits.multiprocessor_count;
  m.def("routing_forward", &emulated_forward, py::arg("u"), py::arg("W"), py::arg("bias"), py::arg("logit_prior"),
      py::arg("num_iterations"), py::arg("leaky") = false, py::arg("detach_routing") = false,
      py::arg("return_couplings") = false, py::arg("schedule") = "ascending", py::arg("seed") = 0,
      py::arg("multiprocessor_count") = h100_sms);
  m.def("routing_backward", &emulated_backward, py::arg("grad_v"), py::arg("u"), py::arg("W"),
      py::arg("logit_prior"), py::arg("s_saved"), py::arg("leaky") = false, py::arg("detach_routing") = false,
      py::arg("schedule") = "ascending", py::arg("seed") = 0, py::arg("multiprocessor_count") = h100_sms,
      py::arg("max_coefficient_bytes") = 0);
  m.def("describe_plan", &describe_plan, py::arg("batch"), py::arg("num_in"), py::arg("num_out"),
      py::arg("dim_out"), py::arg("dim_in"), py::arg("num_iterations"), py::arg("acc_bytes") = 4,
      py::arg("multiprocessor_count") = h100_sms, py::arg("has_prior") = false, py::arg("detach_routing") = false,
      py::arg("async_copies") = true, py::arg("float32_storage") = true,
      py::arg("shared_bytes_per_multiprocessor") = capsnet::cuda::kH100Limits.shared_bytes_per_multiprocessor);
  m.def("last_counters", [] { return last_counters; }, "the chunk trees' counters after the last call");
  m.def("forget_tree_counters", [] { kept_tree_counters().clear(); },
      "drop the kept chunk-tree counters: the next call zeroes a new buffer (a memset in the launch log)");
  m.def("launch_log", [] { return simt::launch_log(); }, "kernel names launched since clear_launch_log()");
  m.def("full_launch_log", [] { return simt::full_launch_log(); },
      "the same launches, with template arguments as written in the launcher");
  m.def("clear_launch_log", &simt::clear_launch_log);
  register_simt_selftests(m);
}
