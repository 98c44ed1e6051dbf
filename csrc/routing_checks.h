// Argument checks shared by the CPU and CUDA launchers of the routing ops.
//
// The Python wrapper (capsnet/validation.py) checks the same things first with the same
// wording; these checks guard direct calls to torch.ops.capsnet.* and keep a bad call
// from reaching a kernel. Each message names the argument, what was received and what
// was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "routing_math.h"

namespace capsnet {

inline bool is_routing_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The dtype of s_saved for inputs of `dtype`: float32 for float16/bfloat16, else the same.
inline at::ScalarType saved_state_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      is_routing_dtype(t.scalar_type()), "capsnet: ", name,
      " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_same_placement(const at::Tensor& t, const char* name, const at::Tensor& u) {
  TORCH_CHECK(
      t.scalar_type() == u.scalar_type(), "capsnet: ", name, " must have the dtype of u (",
      u.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == u.device(), "capsnet: ", name, " must be on the device of u (", u.device(),
      "), got ", t.device());
}

inline void check_logit_prior(const std::optional<at::Tensor>& logit_prior, const at::Tensor& u, const RoutingShape& shape) {
  if (!logit_prior.has_value()) {
    return;
  }
  check_same_placement(*logit_prior, "logit_prior", u);
  TORCH_CHECK(
      logit_prior->dim() == 2 && logit_prior->size(0) == shape.num_in && logit_prior->size(1) == shape.num_out,
      "capsnet: logit_prior must have shape [N_in, N_out] = [", shape.num_in, ", ", shape.num_out,
      "], got logit_prior of shape ", logit_prior->sizes());
}

inline void check_iterations(int64_t num_iterations) {
  TORCH_CHECK(
      num_iterations >= 1 && num_iterations <= kMaxRoutingIterations,
      "capsnet: num_iterations must be between 1 and ", kMaxRoutingIterations, ", got ", num_iterations);
}

inline RoutingShape check_forward_inputs(
    const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& logit_prior, int64_t num_iterations) {
  TORCH_CHECK(u.dim() == 3, "capsnet: u must have 3 dimensions [B, N_in, D_in], got shape ", u.sizes());
  TORCH_CHECK(
      W.dim() == 4, "capsnet: W must have 4 dimensions [N_in, N_out, D_out, D_in], got shape ", W.sizes());
  check_floating(u, "u");
  check_same_placement(W, "W", u);
  RoutingShape shape{u.size(0), u.size(1), W.size(1), W.size(2), u.size(2), num_iterations};
  TORCH_CHECK(
      W.size(0) == shape.num_in && W.size(3) == shape.dim_in, "capsnet: W must have shape [N_in=",
      shape.num_in, ", N_out, D_out, D_in=", shape.dim_in, "] to match u of shape ", u.sizes(),
      ", got W of shape ", W.sizes());
  TORCH_CHECK(
      shape.num_in >= 1 && shape.dim_in >= 1 && shape.num_out >= 1 && shape.dim_out >= 1,
      "capsnet: N_in, D_in, N_out and D_out must be at least 1, got u of shape ", u.sizes(),
      " and W of shape ", W.sizes(), " (only the batch dimension B may be 0)");
  check_iterations(num_iterations);
  if (bias.has_value()) {
    check_same_placement(*bias, "bias", u);
    TORCH_CHECK(
        bias->dim() == 2 && bias->size(0) == shape.num_out && bias->size(1) == shape.dim_out,
        "capsnet: bias must have shape [N_out, D_out] = [", shape.num_out, ", ", shape.dim_out,
        "] to match W of shape ", W.sizes(), ", got bias of shape ", bias->sizes());
  }
  check_logit_prior(logit_prior, u, shape);
  return shape;
}

inline RoutingShape check_backward_inputs(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W,
    const std::optional<at::Tensor>& logit_prior, const at::Tensor& s_saved) {
  TORCH_CHECK(
      s_saved.dim() == 4, "capsnet: s_saved must have 4 dimensions [B, r, N_out, D_out], got shape ",
      s_saved.sizes());
  const RoutingShape shape = check_forward_inputs(u, W, std::nullopt, logit_prior, s_saved.size(1));
  TORCH_CHECK(
      s_saved.scalar_type() == saved_state_dtype(u.scalar_type()), "capsnet: s_saved must have dtype ",
      saved_state_dtype(u.scalar_type()), " for u of dtype ", u.scalar_type(), ", got ", s_saved.scalar_type());
  TORCH_CHECK(
      s_saved.device() == u.device(), "capsnet: s_saved must be on the device of u (", u.device(), "), got ",
      s_saved.device());
  check_same_placement(grad_v, "grad_v", u);
  TORCH_CHECK(
      s_saved.size(0) == shape.batch && s_saved.size(2) == shape.num_out && s_saved.size(3) == shape.dim_out,
      "capsnet: s_saved must have shape [B=", shape.batch, ", r, N_out=", shape.num_out, ", D_out=",
      shape.dim_out, "], got ", s_saved.sizes());
  TORCH_CHECK(
      grad_v.dim() == 3 && grad_v.size(0) == shape.batch && grad_v.size(1) == shape.num_out &&
          grad_v.size(2) == shape.dim_out,
      "capsnet: grad_v must have shape [B, N_out, D_out] = [", shape.batch, ", ", shape.num_out, ", ",
      shape.dim_out, "], got ", grad_v.sizes());
  return shape;
}

}  // namespace capsnet
