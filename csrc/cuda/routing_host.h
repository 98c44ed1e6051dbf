// Host side of one routing_forward / routing_backward call on the CUDA kernels: argument
// checks, input preparation, outputs and workspaces; the kernel launches themselves, in
// order, are routing_launches.h.
//
// Shared by the CUDA launcher (routing_kernel.cu, cuda_launcher.h) and the CPU emulator's
// launcher (csrc/simt/emulated_routing.cpp), which differ only in how one kernel is
// launched (the `Launcher` of routing_launches.h) and in where the tensors live.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "routing_checks.h"
#include "routing_launches.h"

namespace capsnet::cuda {

struct HostOptions {
  c10::DeviceType device_type;  // where every tensor argument must live
  DeviceLimits limits;
  // Fill outputs and workspaces with NaN instead of leaving them uninitialised, so that a
  // kernel reading an element nobody wrote shows up in the results (the emulator does this).
  bool poison_memory;
  // The emulator's tests read the backward's coefficient workspace (the recomputed
  // couplings) and the chunk trees' counters after a call through these; nullptr otherwise.
  at::Tensor* coefficients_out = nullptr;
  at::Tensor* counters_out = nullptr;
  // The backward's coefficient workspace bound (tests make it small to run the slices).
  int64_t max_coefficient_bytes = kMaxCoefficientBytes;
  // Choices that replace the planner's (plan_choices_from_environment); none by default.
  PlanChoices plan_choices = {};
};

// CAPSNET_CUDA_PLAN, for experiments (benchmarks/plan_sweep.py, benchmarks/cuda_profile.py):
// a comma-separated list of `inputs_per_chunk=N` (N >= 1), `sample_groups=N` (1, 2, 4 or 8),
// `staging_slots=N` and `sweep_staging_slots=N` (0 or kInputRingSlots), `gradient_rows=N`
// (kWideGradientRows or kNarrowGradientRows) and `gradient_loads_ahead=N` (0 or 1) that
// replace the planner's choices (PlanChoices, routing_launch.h),
// e.g. "inputs_per_chunk=9,sample_groups=8".
// Read on every call, so that one process can time several plans. Unset or empty: none.
// The messages format numbers with std::to_string: on one GPU machine (torch 2.11, nvcc
// 13.0) c10::str dropped the integers in them, in this nvcc-compiled header only; the
// std::to_string numbers of unsupported_shape_reason came through.
inline PlanChoices plan_choices_from_environment() {
  PlanChoices choices;
  const char* text = std::getenv("CAPSNET_CUDA_PLAN");
  if (text == nullptr) {
    return choices;
  }
  const std::string all(text);
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find(',', start);
    end = end == std::string::npos ? all.size() : end;
    const std::string item = all.substr(start, end - start);
    start = end + 1;
    if (item.empty()) {
      continue;
    }
    const size_t equals = item.find('=');
    const std::string key = item.substr(0, equals);
    const std::string value = equals == std::string::npos ? "" : item.substr(equals + 1);
    TORCH_CHECK(key == "inputs_per_chunk" || key == "sample_groups" || key == "staging_slots" || key == "gradient_rows" ||
                    key == "sweep_staging_slots" || key == "gradient_loads_ahead",
                "CAPSNET_CUDA_PLAN: unknown choice '", key, "' in '", all,
                "'; the choices are inputs_per_chunk=N, sample_groups=N, staging_slots=N, gradient_rows=N, "
                "sweep_staging_slots=N and gradient_loads_ahead=N");
    size_t parsed = 0;
    long long number = 0;
    try {
      number = std::stoll(value, &parsed);
    } catch (const std::exception&) {
      parsed = 0;
    }
    TORCH_CHECK(parsed > 0 && parsed == value.size(), "CAPSNET_CUDA_PLAN: ", key, " must be an integer, got '", value, "'");
    const std::string got = ", got " + std::to_string(number);
    if (key == "inputs_per_chunk") {
      TORCH_CHECK(number >= 1, "CAPSNET_CUDA_PLAN: inputs_per_chunk must be >= 1", got);
      choices.inputs_per_chunk = number;
    } else if (key == "staging_slots" || key == "sweep_staging_slots") {
      TORCH_CHECK(number == 0 || number == kInputRingSlots,
                  "CAPSNET_CUDA_PLAN: " + key + " must be 0 or " + std::to_string(kInputRingSlots) + got);
      (key == "staging_slots" ? choices.staging_slots : choices.sweep_staging_slots) = number;
    } else if (key == "gradient_rows") {
      TORCH_CHECK(number == kWideGradientRows || number == kNarrowGradientRows,
                  "CAPSNET_CUDA_PLAN: gradient_rows must be " + std::to_string(kWideGradientRows) + " or " +
                      std::to_string(kNarrowGradientRows) + got);
      choices.gradient_rows = number;
    } else if (key == "gradient_loads_ahead") {
      TORCH_CHECK(number == 0 || number == 1, "CAPSNET_CUDA_PLAN: gradient_loads_ahead must be 0 or 1" + got);
      choices.gradient_loads_ahead = number;
    } else {
      TORCH_CHECK(number == 1 || number == 2 || number == 4 || number == 8,
                  "CAPSNET_CUDA_PLAN: sample_groups must be 1, 2, 4 or 8", got);
      choices.sample_groups = number;
    }
  }
  return choices;
}

// The choices that apply to storage of `dtype`: the input rings, the wide gradient rows and
// the gradient kernel without its loads ahead are compiled for float32 storage only.
inline PlanChoices plan_choices_for(PlanChoices choices, at::ScalarType dtype) {
  if (dtype != at::kFloat) {
    choices.staging_slots = 0;
    choices.sweep_staging_slots = 0;
    choices.gradient_rows = 0;
    choices.gradient_loads_ahead = -1;
  }
  return choices;
}

// ---------------------------------------------------------------------------------------
// Argument checks: those of every backend (csrc/routing_checks.h), plus where the tensors
// live and the shape limits of these kernels.
// ---------------------------------------------------------------------------------------
inline void check_device(const at::Tensor& u, const HostOptions& options) {
  // The other tensors are on u's device (checked by check_*_inputs).
  TORCH_CHECK(u.device().type() == options.device_type, "capsnet: u must be a ",
      c10::DeviceTypeName(options.device_type), " tensor for this kernel, got one on ", u.device());
}

inline void check_supported(const RoutingShape& shape, const DeviceLimits& limits) {
  const std::string reason = unsupported_shape_reason(shape, limits);
  TORCH_CHECK(reason.empty(), reason);
}

inline RoutingShape check_forward_arguments(
    const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& logit_prior, int64_t num_iterations, const HostOptions& options) {
  const RoutingShape shape = check_forward_inputs(u, W, bias, logit_prior, num_iterations);
  check_device(u, options);
  check_supported(shape, options.limits);
  return shape;
}

inline RoutingShape check_backward_arguments(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& logit_prior,
    const at::Tensor& s_saved, const HostOptions& options) {
  const RoutingShape shape = check_backward_inputs(grad_v, u, W, logit_prior, s_saved);
  check_device(u, options);
  check_supported(shape, options.limits);
  return shape;
}

// ---------------------------------------------------------------------------------------
// Tensors.
// ---------------------------------------------------------------------------------------

// Contiguous, and 16-byte aligned: the CapsNet tile reads rows of u, W and bias as 16-byte
// vectors. A contiguous view into the middle of a storage may be misaligned; copy it then.
// (The outputs, v included, which the CapsNet tile writes as 16-byte vectors, are fresh
// allocations: aligned.)
inline at::Tensor kernel_input(const at::Tensor& t) {
  at::Tensor contiguous = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(contiguous.data_ptr()) % 16 != 0) {
    contiguous = contiguous.clone(at::MemoryFormat::Contiguous);
  }
  return contiguous;
}

inline std::optional<at::Tensor> optional_input(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

inline std::optional<at::Tensor> optional_kernel_input(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(kernel_input(*t)) : std::nullopt;
}

inline at::Tensor new_buffer(at::IntArrayRef shape, at::ScalarType dtype, const at::Tensor& like, const HostOptions& options) {
  const at::TensorOptions tensor_options = like.options().dtype(dtype);
  if (options.poison_memory) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), tensor_options);
  }
  return at::empty(shape, tensor_options);
}

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// The couplings of the prior, c_0 [I, J] in the op-math type, computed on the device.
template <typename scalar_t, typename Launcher>
at::Tensor prior_couplings(
    const Launcher& launch, const RoutingPlan& plan, const RoutingOptions& routing, const at::Tensor& logit_prior,
    const HostOptions& options) {
  using acc_t = opmath_t<scalar_t>;
  const RoutingShape& n = plan.geometry.shape;
  at::Tensor out = new_buffer({n.num_in, n.num_out}, c10::CppTypeToScalarType<acc_t>::value, logit_prior, options);
  PriorParams<scalar_t> p{};
  p.geometry = plan.geometry;
  p.options = routing;
  p.logit_prior = logit_prior.const_data_ptr<scalar_t>();
  p.prior_couplings = out.data_ptr<acc_t>();
  launch_prior_coupling(launch, plan, p);
  return out;
}

// ---------------------------------------------------------------------------------------
// The chunk trees' counters, and the scalar types the kernels are instantiated for.
// ---------------------------------------------------------------------------------------

// The chunk trees' arrival counters ([sample tiles, chunks] int32, or a longer buffer), all
// zero at the start; every tree leaves them at zero, so they serve all the launches of the
// call (and, kept by the launcher, later calls: tree_counters.h). Empty when no launch of
// the call uses a tree.
template <typename Launcher>
at::Tensor zeroed_counters(const Launcher& launch, bool uses_trees, int64_t numel, const at::Tensor& like) {
  return uses_trees ? launch.tree_counters(numel, like) : at::empty({0}, like.options().dtype(at::kInt));
}

// The CUDA build instantiates the launches of these types in its launch_*.cu files
// (CAPSNET_FOR_EACH_ROUTING_TYPE in routing_instances.h lists the same four).
#define CAPSNET_DISPATCH_ROUTING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------------------
// The two ops. The caller has made the tensors' device current.
// ---------------------------------------------------------------------------------------
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_forward_host(
    const at::Tensor& u_arg, const at::Tensor& W_arg, const std::optional<at::Tensor>& bias_arg,
    const std::optional<at::Tensor>& prior_arg, int64_t num_iterations, bool leaky, bool detach_routing,
    bool return_couplings, const HostOptions& options, const Launcher& launch) {
  const RoutingShape shape = check_forward_arguments(u_arg, W_arg, bias_arg, prior_arg, num_iterations, options);
  const at::Tensor u = kernel_input(u_arg);
  const at::Tensor W = kernel_input(W_arg);
  const std::optional<at::Tensor> bias = optional_kernel_input(bias_arg);
  const std::optional<at::Tensor> logit_prior = optional_input(prior_arg);
  const at::ScalarType acc_dtype = saved_state_dtype(u.scalar_type());
  const RoutingOptions routing{leaky, detach_routing};

  at::Tensor v = new_buffer({shape.batch, shape.num_out, shape.dim_out}, u.scalar_type(), u, options);
  at::Tensor s_saved = new_buffer({shape.batch, num_iterations, shape.num_out, shape.dim_out}, acc_dtype, u, options);
  at::Tensor couplings = return_couplings
      ? new_buffer({shape.batch, shape.num_in, shape.num_out}, u.scalar_type(), u, options)
      : at::empty({0}, u.options());
  if (shape.batch == 0) {
    return {v, s_saved, couplings};
  }
  const PlanChoices choices = plan_choices_for(options.plan_choices, u.scalar_type());
  const RoutingPlan plan =
      plan_routing(shape, logit_prior.has_value(), detach_routing, at::elementSize(acc_dtype), options.limits, choices);
  at::Tensor partials = new_buffer({plan.partials_numel}, acc_dtype, u, options);
  at::Tensor agreement = new_buffer({plan.agreement_numel}, acc_dtype, u, options);
  at::Tensor counters = zeroed_counters(launch, plan.geometry.part.chunk_levels > 0, plan.counters_numel, u);

  CAPSNET_DISPATCH_ROUTING_TYPES(u.scalar_type(), "capsnet::routing_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    at::Tensor c0;
    if (logit_prior.has_value()) {
      c0 = prior_couplings<scalar_t>(launch, plan, routing, *logit_prior, options);
    }
    ForwardParams<scalar_t> p{};
    p.geometry = plan.geometry;
    p.options = routing;
    p.u = u.const_data_ptr<scalar_t>();
    p.W = W.const_data_ptr<scalar_t>();
    p.bias = data_or_null<scalar_t>(bias);
    p.logit_prior = data_or_null<scalar_t>(logit_prior);
    p.prior_couplings = c0.defined() ? c0.const_data_ptr<acc_t>() : nullptr;
    p.v = v.data_ptr<scalar_t>();
    p.s_saved = s_saved.data_ptr<acc_t>();
    p.couplings = return_couplings ? couplings.data_ptr<scalar_t>() : nullptr;
    p.partials = partials.data_ptr<acc_t>();
    p.tree_counters = data_or_null<int>(counters);
    p.agreement = data_or_null<acc_t>(agreement);
    launch_forward(launch, plan, p);
  });
  if (options.counters_out != nullptr) {
    *options.counters_out = counters;
  }
  return {v, s_saved, couplings};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_backward_host(
    const at::Tensor& grad_v_arg, const at::Tensor& u_arg, const at::Tensor& W_arg,
    const std::optional<at::Tensor>& prior_arg, const at::Tensor& s_saved_arg, bool leaky, bool detach_routing,
    const HostOptions& options, const Launcher& launch) {
  const RoutingShape shape = check_backward_arguments(grad_v_arg, u_arg, W_arg, prior_arg, s_saved_arg, options);
  const at::Tensor grad_v = grad_v_arg.contiguous();
  const at::Tensor u = kernel_input(u_arg);
  const at::Tensor W = kernel_input(W_arg);
  const std::optional<at::Tensor> logit_prior = optional_input(prior_arg);
  const at::Tensor s_saved = s_saved_arg.contiguous();
  const at::ScalarType acc_dtype = saved_state_dtype(u.scalar_type());
  const int64_t acc_bytes = at::elementSize(acc_dtype);
  const RoutingOptions routing{leaky, detach_routing};
  const bool has_prior = logit_prior.has_value();
  const bool wants_prior_grad = has_prior && !detach_routing;

  if (shape.batch == 0) {  // sums over an empty batch
    return {
        at::empty_like(u, at::MemoryFormat::Contiguous), at::zeros_like(W, at::MemoryFormat::Contiguous),
        at::zeros({shape.num_out, shape.dim_out}, u.options()),
        wants_prior_grad ? at::zeros({shape.num_in, shape.num_out}, u.options()) : at::empty({0}, u.options())};
  }
  // The batch in slices when the coefficient workspace would pass its bound: one plan for
  // the full slices, one for the remainder; the workspaces fit the larger.
  const int64_t slice = backward_slice_batch(shape, has_prior, detach_routing, acc_bytes, options.max_coefficient_bytes);
  const int64_t remainder = shape.batch % slice;
  RoutingShape slice_shape = shape;
  slice_shape.batch = slice;
  const PlanChoices choices = plan_choices_for(options.plan_choices, u.scalar_type());
  const RoutingPlan plan = plan_routing(slice_shape, has_prior, detach_routing, acc_bytes, options.limits, choices);
  RoutingShape remainder_shape = shape;
  remainder_shape.batch = remainder > 0 ? remainder : slice;
  const RoutingPlan remainder_plan =
      plan_routing(remainder_shape, has_prior, detach_routing, acc_bytes, options.limits, choices);
  const auto larger = [](int64_t a, int64_t b) { return a < b ? b : a; };
  at::Tensor agreement = new_buffer({plan.agreement_numel}, acc_dtype, u, options);
  at::Tensor terms = new_buffer({plan.terms_numel}, acc_dtype, u, options);
  at::Tensor coefficients = new_buffer({plan.coefficients_numel}, acc_dtype, u, options);
  at::Tensor partials =
      new_buffer({detach_routing ? 0 : larger(plan.partials_numel, remainder_plan.partials_numel)}, acc_dtype, u, options);
  at::Tensor counters = zeroed_counters(launch,
      !detach_routing && shape.iterations > 1 &&
          (plan.geometry.part.chunk_levels > 0 || remainder_plan.geometry.part.chunk_levels > 0),
      larger(plan.counters_numel, remainder_plan.counters_numel), u);
  at::Tensor grad_u = new_buffer(u.sizes(), u.scalar_type(), u, options);
  at::Tensor grad_W = new_buffer(W.sizes(), u.scalar_type(), u, options);
  at::Tensor grad_bias = new_buffer({shape.num_out, shape.dim_out}, u.scalar_type(), u, options);
  at::Tensor grad_prior = wants_prior_grad ? new_buffer({shape.num_in, shape.num_out}, u.scalar_type(), u, options)
                                           : at::empty({0}, u.options());
  // In slices, dW, dbias and dprior are sums over the slices, in the op-math type: the
  // outputs themselves when that is their dtype, else separate sums converted at the end.
  const bool sliced = slice < shape.batch;
  const bool separate_sums = sliced && acc_dtype != u.scalar_type();
  at::Tensor grad_W_sum, grad_bias_sum, grad_prior_sum;
  if (sliced) {
    grad_W_sum = separate_sums ? new_buffer(W.sizes(), acc_dtype, u, options) : grad_W;
    grad_bias_sum = separate_sums ? new_buffer(grad_bias.sizes(), acc_dtype, u, options) : grad_bias;
    grad_prior_sum = separate_sums ? new_buffer(grad_prior.sizes(), acc_dtype, u, options) : grad_prior;
  }

  CAPSNET_DISPATCH_ROUTING_TYPES(u.scalar_type(), "capsnet::routing_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    at::Tensor c0;
    if (has_prior) {
      c0 = prior_couplings<scalar_t>(launch, plan, routing, *logit_prior, options);
    }
    BackwardParams<scalar_t> p{};
    p.options = routing;
    p.terms_of = BackwardTerms{shape.iterations, detach_routing, has_prior};
    p.W = W.const_data_ptr<scalar_t>();
    p.logit_prior = data_or_null<scalar_t>(logit_prior);
    p.prior_couplings = c0.defined() ? c0.const_data_ptr<acc_t>() : nullptr;
    p.agreement = data_or_null<acc_t>(agreement);
    p.terms = terms.data_ptr<acc_t>();
    p.coefficients = data_or_null<acc_t>(coefficients);
    p.partials = data_or_null<acc_t>(partials);
    p.tree_counters = data_or_null<int>(counters);
    p.grad_W = grad_W.data_ptr<scalar_t>();
    p.grad_bias = grad_bias.data_ptr<scalar_t>();
    p.grad_prior = wants_prior_grad ? grad_prior.data_ptr<scalar_t>() : nullptr;
    if (sliced) {
      p.grad_W_sum = grad_W_sum.data_ptr<acc_t>();
      p.grad_bias_sum = grad_bias_sum.data_ptr<acc_t>();
      p.grad_prior_sum = wants_prior_grad ? grad_prior_sum.data_ptr<acc_t>() : nullptr;
    }
    for (int64_t first = 0; first < shape.batch; first += slice) {
      const bool full = first + slice <= shape.batch;
      p.geometry = full ? plan.geometry : remainder_plan.geometry;
      p.strides = gradient_strides(p.geometry, p.terms_of);
      p.first_slice = first == 0;
      p.grad_v = grad_v.const_data_ptr<scalar_t>() + first * shape.num_out * shape.dim_out;
      p.u = u.const_data_ptr<scalar_t>() + first * shape.num_in * shape.dim_in;
      p.s_saved = s_saved.const_data_ptr<acc_t>() + first * shape.iterations * shape.num_out * shape.dim_out;
      p.grad_u = grad_u.data_ptr<scalar_t>() + first * shape.num_in * shape.dim_in;
      launch_backward(launch, full ? plan : remainder_plan, p);
    }
  });
  if (separate_sums) {
    grad_W.copy_(grad_W_sum);
    grad_bias.copy_(grad_bias_sum);
    if (wants_prior_grad) {
      grad_prior.copy_(grad_prior_sum);
    }
  }
  if (options.coefficients_out != nullptr) {
    *options.coefficients_out = coefficients;
  }
  if (options.counters_out != nullptr) {
    *options.counters_out = counters;
  }
  return {grad_u, grad_W, grad_bias, grad_prior};
}

}  // namespace capsnet::cuda
