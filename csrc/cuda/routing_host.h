// Host side of one routing_forward / routing_backward call on the CUDA kernels: argument
// checks, input preparation, outputs and workspaces, and the order of the kernel launches.
//
// Shared by the CUDA launcher (routing_kernel.cu) and the CPU emulator's launcher
// (csrc/simt/emulated_routing.cpp), which differ only in how one kernel is launched (the
// `Launcher` below) and in where the tensors live.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "routing_checks.h"
#include "routing_kernel.cuh"
#include "routing_launch.h"

namespace capsnet::cuda {

using capsnet::RoutingShape;

// A kernel as a launcher sees it: its address, and its name as written in the source (the
// emulator logs it, so that tests can check that every kernel ran).
template <typename Params>
struct KernelRef {
  void (*function)(Params);
  const char* name;
};

template <typename Params>
KernelRef<Params> make_kernel_ref(void (*function)(Params), const char* name) {
  return {function, name};
}

// CAPSNET_KERNEL(forward_squash_kernel<scalar_t>) -> KernelRef (variadic: template argument
// lists contain commas).
#define CAPSNET_KERNEL(...) ::capsnet::cuda::make_kernel_ref(&__VA_ARGS__, #__VA_ARGS__)

// A Launcher is callable as launcher(KernelRef<Params>, const KernelLaunch&, const Params&)
// and runs the kernel once with that configuration, in stream order.

struct HostOptions {
  c10::DeviceType device_type;  // where every tensor argument must live
  DeviceLimits limits;
  // Fill outputs and workspaces with NaN instead of leaving them uninitialised, so that a
  // kernel reading an element nobody wrote shows up in the results (the emulator does this).
  bool poison_memory;
};

// ---------------------------------------------------------------------------------------
// Argument checks: those of every backend (csrc/routing_checks.h, shared with the CPU
// kernel), plus where the tensors live and the shape limits of these kernels.
// ---------------------------------------------------------------------------------------
inline void check_device(const at::Tensor& u, const HostOptions& options) {
  // The other tensors are on u's device (checked by check_*_inputs).
  TORCH_CHECK(u.device().type() == options.device_type, "capsnet: u must be a ",
      c10::DeviceTypeName(options.device_type), " tensor for this kernel, got one on ", u.device());
}

inline void check_supported(const RoutingShape& shape, const DeviceLimits& limits) {
  const std::string reason =
      unsupported_shape_reason(shape.num_out, shape.dim_out, shape.dim_in, shape.iterations, limits);
  TORCH_CHECK(reason.empty(), reason);
}

inline void check_forward_arguments(
    const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& bias, int64_t num_iterations,
    const HostOptions& options) {
  const RoutingShape shape = check_forward_inputs(u, W, bias, num_iterations);
  check_device(u, options);
  check_supported(shape, options.limits);
}

inline void check_backward_arguments(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W, const at::Tensor& s_saved,
    const at::Tensor& couplings, const HostOptions& options) {
  const RoutingShape shape = check_backward_inputs(grad_v, u, W, s_saved, couplings);
  check_device(u, options);
  check_supported(shape, options.limits);
}

// ---------------------------------------------------------------------------------------
// Tensors.
// ---------------------------------------------------------------------------------------

// Contiguous, and 16-byte aligned: the CapsNet tile reads rows of u and W as 16-byte
// vectors. A contiguous view into the middle of a storage may be misaligned; copy it then.
inline at::Tensor kernel_input(const at::Tensor& t) {
  at::Tensor contiguous = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(contiguous.data_ptr()) % 16 != 0) {
    contiguous = contiguous.clone(at::MemoryFormat::Contiguous);
  }
  return contiguous;
}

inline at::Tensor new_buffer(at::IntArrayRef shape, const at::Tensor& like, const HostOptions& options) {
  if (options.poison_memory) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), like.options());
  }
  return at::empty(shape, like.options());
}

template <typename scalar_t>
scalar_t* data_or_null(at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr;
}

// ---------------------------------------------------------------------------------------
// Launch order.
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename Launcher>
void launch_forward(const Launcher& launch, const RoutingPlan& plan, ForwardParams<scalar_t> p) {
  visit_tile(plan.tile, [&](auto tile) {
    using Tile = decltype(tile);
    for (int k = 0; k < plan.sizes.iterations; ++k) {
      p.iteration = k;
      launch(CAPSNET_KERNEL(forward_partial_sums_kernel<scalar_t, Tile>), plan.forward_partial_sums, p);
      launch(CAPSNET_KERNEL(forward_squash_kernel<scalar_t>), plan.squash, p);
    }
  });
}

// Backward, part 1: the reverse sweep over the iterations (gs_k, v_k, G_m).
template <typename scalar_t, typename Launcher>
void launch_backward_sweep(const Launcher& launch, const RoutingPlan& plan, BackwardParams<scalar_t> p) {
  visit_tile(plan.tile, [&](auto tile) {
    using Tile = decltype(tile);
    const int last = plan.sizes.iterations - 1;
    p.iteration = last;  // gs_{r-1} from grad_v
    launch(CAPSNET_KERNEL(backward_squash_kernel<scalar_t>), plan.squash, p);
    for (int m = last; m >= 1; --m) {
      p.iteration = m;  // G_m and the partial sums of dL/dv_{m-1}
      launch(CAPSNET_KERNEL(backward_partial_sums_kernel<scalar_t, Tile>), plan.backward_partial_sums, p);
      p.iteration = m - 1;  // gs_{m-1}
      launch(CAPSNET_KERNEL(backward_squash_kernel<scalar_t>), plan.squash, p);
    }
  });
}

// Backward, part 2: dL/dW, dL/dbias and dL/du from what the sweep left.
template <typename scalar_t, typename Launcher>
void launch_backward_gradients(const Launcher& launch, const RoutingPlan& plan, const BackwardParams<scalar_t>& p) {
  visit_tile(plan.tile, [&](auto tile) {
    using Tile = decltype(tile);
    launch(CAPSNET_KERNEL(grad_weight_kernel<scalar_t, Tile>), plan.grad_weight, p);
    launch(CAPSNET_KERNEL(grad_input_kernel<scalar_t, Tile>), plan.grad_input, p);
  });
}

// ---------------------------------------------------------------------------------------
// The two ops. Arguments must have passed check_forward_arguments / check_backward_arguments;
// the caller has made the tensors' device current.
// ---------------------------------------------------------------------------------------
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_forward_host(
    const at::Tensor& u_arg, const at::Tensor& W_arg, const std::optional<at::Tensor>& bias_arg,
    int64_t num_iterations, const HostOptions& options, const Launcher& launch) {
  const at::Tensor u = kernel_input(u_arg);
  const at::Tensor W = kernel_input(W_arg);
  const std::optional<at::Tensor> bias =
      bias_arg.has_value() ? std::optional<at::Tensor>(bias_arg->contiguous()) : std::nullopt;
  const int64_t batch = u.size(0), num_in = u.size(1), dim_in = u.size(2);
  const int64_t num_out = W.size(1), dim_out = W.size(2);

  at::Tensor v = new_buffer({batch, num_out, dim_out}, u, options);
  at::Tensor s_saved = new_buffer({batch, num_iterations, num_out, dim_out}, u, options);
  at::Tensor couplings = new_buffer({batch, num_iterations, num_out, num_in}, u, options);
  if (batch == 0) {
    return {v, s_saved, couplings};
  }
  const RoutingPlan plan =
      plan_routing(batch, num_in, num_out, dim_out, dim_in, num_iterations, u.element_size(), options.limits);
  at::Tensor partials = new_buffer({plan.partials_numel}, u, options);

  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet::routing_forward", [&] {
    ForwardParams<scalar_t> p{};
    p.sizes = plan.sizes;
    p.u = u.const_data_ptr<scalar_t>();
    p.W = W.const_data_ptr<scalar_t>();
    p.bias = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    p.v = v.data_ptr<scalar_t>();
    p.s_saved = s_saved.data_ptr<scalar_t>();
    p.couplings = couplings.data_ptr<scalar_t>();
    p.partials = partials.data_ptr<scalar_t>();
    launch_forward(launch, plan, p);
  });
  return {v, s_saved, couplings};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_backward_host(
    const at::Tensor& grad_v_arg, const at::Tensor& u_arg, const at::Tensor& W_arg, const at::Tensor& s_saved_arg,
    const at::Tensor& couplings_arg, const HostOptions& options, const Launcher& launch) {
  const at::Tensor grad_v = grad_v_arg.contiguous();
  const at::Tensor u = kernel_input(u_arg);
  const at::Tensor W = kernel_input(W_arg);
  const at::Tensor s_saved = s_saved_arg.contiguous();
  const at::Tensor couplings = couplings_arg.contiguous();
  const int64_t batch = u.size(0), num_in = u.size(1), dim_in = u.size(2);
  const int64_t num_out = W.size(1), dim_out = W.size(2);
  const int64_t num_iterations = s_saved.size(1);

  if (batch == 0) {  // sums over an empty batch
    return {new_buffer(u.sizes(), u, options), at::zeros_like(W), at::zeros({num_out, dim_out}, u.options())};
  }
  const RoutingPlan plan =
      plan_routing(batch, num_in, num_out, dim_out, dim_in, num_iterations, u.element_size(), options.limits);
  at::Tensor grad_s = new_buffer({plan.per_iteration_numel}, u, options);
  at::Tensor squashed = new_buffer({plan.per_iteration_numel}, u, options);
  at::Tensor logit_grad = new_buffer({plan.logit_grad_numel}, u, options);
  at::Tensor grad_u, grad_W, grad_bias;

  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "capsnet::routing_backward", [&] {
    BackwardParams<scalar_t> p{};
    p.sizes = plan.sizes;
    p.grad_v = grad_v.const_data_ptr<scalar_t>();
    p.u = u.const_data_ptr<scalar_t>();
    p.W = W.const_data_ptr<scalar_t>();
    p.s_saved = s_saved.const_data_ptr<scalar_t>();
    p.couplings = couplings.const_data_ptr<scalar_t>();
    p.grad_s = grad_s.data_ptr<scalar_t>();
    p.squashed = squashed.data_ptr<scalar_t>();
    p.logit_grad = data_or_null<scalar_t>(logit_grad);  // empty when r = 1
    p.grad_weight_inputs = plan.grad_weight_inputs;
    p.grad_input_slice = plan.grad_input_slice;
    {
      at::Tensor partials = new_buffer({plan.partials_numel}, u, options);
      p.partials = partials.data_ptr<scalar_t>();
      launch_backward_sweep(launch, plan, p);
      p.partials = nullptr;
    }  // partials released (stream-ordered): the gradients below can take its memory
    grad_u = new_buffer(u.sizes(), u, options);
    grad_W = new_buffer(W.sizes(), u, options);
    grad_bias = new_buffer({num_out, dim_out}, u, options);
    p.grad_u = grad_u.data_ptr<scalar_t>();
    p.grad_W = grad_W.data_ptr<scalar_t>();
    p.grad_bias = grad_bias.data_ptr<scalar_t>();
    launch_backward_gradients(launch, plan, p);
  });
  return {grad_u, grad_W, grad_bias};
}

}  // namespace capsnet::cuda
