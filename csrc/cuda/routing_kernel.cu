// CUDA kernels of capsnet::routing_forward / routing_backward: the launcher.
//
// The kernels are in routing_forward.cuh, routing_backward.cuh and routing_gradients.cuh
// (device utilities in routing_device.cuh and routing_tree.cuh), the launch plan in
// routing_launch.h, and the host side shared with the CPU emulator (checks, tensors, launch
// order) in routing_host.h, the launches of one call in routing_launches.h. The <<<>>> launch
// with its checks is cuda_launcher.h; the kernels compile in the launch_*.cu files
// (routing_instances.h). What is left here: the device guard, the current stream, the
// device's limits, the kept tree counters, and the registration for the CUDA dispatch key.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_launcher.h"
#include "routing_host.h"
#include "routing_instances.h"
#include "tree_counters.h"

namespace capsnet::cuda {

// Compiled in the launch_*.cu files.
CAPSNET_FOR_EACH_ROUTING_TYPE(CAPSNET_FORWARD_LAUNCHES, extern template)
CAPSNET_FOR_EACH_ROUTING_TYPE(CAPSNET_BACKWARD_LAUNCHES, extern template)

namespace {

// The chunk trees' counters kept per (device, stream); never destroyed, so that no CUDA
// memory is freed while the process exits.
TreeCounterCache& kept_tree_counters() {
  static TreeCounterCache* const cache = new TreeCounterCache();
  return *cache;
}

}  // namespace

void forget_tree_counters(cudaStream_t stream) {
  kept_tree_counters().drop(stream, c10::cuda::current_device());
}

at::Tensor CudaLauncher::tree_counters(int64_t numel, const at::Tensor& like) const {
  const auto zero = [&](at::Tensor& tensor) {
    C10_CUDA_CHECK(cudaMemsetAsync(tensor.data_ptr(), 0, tensor.nbytes(), stream));
  };
  // A CUDA graph replays with the addresses it captured: its counters are its own
  // (allocated in the graph's pool, zeroed by a captured memset), never a kept buffer that
  // a later call could replace and free.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return kept_tree_counters().take(stream, like.options(), numel, zero, capture == cudaStreamCaptureStatusNone);
}

namespace {

int device_attribute(cudaDeviceAttr attribute, c10::DeviceIndex device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// The current device's limits. (Queried with the runtime API rather than through
// ATen/cuda/CUDAContext.h, which would make the build need the cuBLAS/cuSPARSE headers.)
HostOptions cuda_options() {
  const c10::DeviceIndex device = c10::cuda::current_device();
  const DeviceLimits limits{
      device_attribute(cudaDevAttrMultiProcessorCount, device),
      device_attribute(cudaDevAttrMaxThreadsPerBlock, device),
      device_attribute(cudaDevAttrMaxSharedMemoryPerBlock, device),
      /*async_copies=*/device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 8,
      device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
      device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)};
  HostOptions options{c10::DeviceType::CUDA, limits, /*poison_memory=*/false};
  options.plan_choices = plan_choices_from_environment();
  return options;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_forward_cuda(
    const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& logit_prior, int64_t num_iterations, bool leaky, bool detach_routing,
    bool return_couplings) {
  // u on a GPU before the guard (which needs one); the rest is checked against the
  // properties of u's device.
  TORCH_CHECK(u.is_cuda(), "capsnet: u must be a CUDA tensor, got one on ", u.device());
  const c10::cuda::CUDAGuard device_guard(u.device());
  const CudaLauncher launcher{c10::cuda::getCurrentCUDAStream().stream()};
  return routing_forward_host(
      u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings, cuda_options(), launcher);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_backward_cuda(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& logit_prior,
    const at::Tensor& s_saved, bool leaky, bool detach_routing) {
  TORCH_CHECK(u.is_cuda(), "capsnet: u must be a CUDA tensor, got one on ", u.device());
  const c10::cuda::CUDAGuard device_guard(u.device());
  const CudaLauncher launcher{c10::cuda::getCurrentCUDAStream().stream()};
  return routing_backward_host(grad_v, u, W, logit_prior, s_saved, leaky, detach_routing, cuda_options(), launcher);
}

}  // namespace
}  // namespace capsnet::cuda

TORCH_LIBRARY_IMPL(capsnet, CUDA, m) {
  m.impl("routing_forward", &capsnet::cuda::routing_forward_cuda);
  m.impl("routing_backward", &capsnet::cuda::routing_backward_cuda);
}
