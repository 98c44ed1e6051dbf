// Argument checks shared by the CPU and CUDA launchers of the routing ops.
//
// The Python wrapper (capsnet/validation.py) checks the same things first with the same
// wording; these checks guard direct calls to torch.ops.capsnet.* and keep a bad call
// from reaching a kernel. Each message names the argument, what was received and what
// was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace capsnet {

// Sizes of one routing problem, read off u and W.
struct RoutingShape {
  int64_t batch;       // B
  int64_t num_in;      // N_in
  int64_t num_out;     // N_out
  int64_t dim_out;     // D_out
  int64_t dim_in;      // D_in
  int64_t iterations;  // r

  int64_t out_size() const { return num_out * dim_out; }  // N_out * D_out
};

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
      "capsnet: ", name, " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_placement(const at::Tensor& t, const char* name, const at::Tensor& u) {
  TORCH_CHECK(
      t.scalar_type() == u.scalar_type(), "capsnet: ", name, " must have the dtype of u (",
      u.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == u.device(), "capsnet: ", name, " must be on the device of u (", u.device(),
      "), got ", t.device());
}

inline RoutingShape check_forward_inputs(
    const at::Tensor& u, const at::Tensor& W, const std::optional<at::Tensor>& bias,
    int64_t num_iterations) {
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
  TORCH_CHECK(num_iterations >= 1, "capsnet: num_iterations must be at least 1, got ", num_iterations);
  if (bias.has_value()) {
    check_same_placement(*bias, "bias", u);
    TORCH_CHECK(
        bias->dim() == 2 && bias->size(0) == shape.num_out && bias->size(1) == shape.dim_out,
        "capsnet: bias must have shape [N_out, D_out] = [", shape.num_out, ", ", shape.dim_out,
        "] to match W of shape ", W.sizes(), ", got bias of shape ", bias->sizes());
  }
  return shape;
}

inline RoutingShape check_backward_inputs(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W, const at::Tensor& s_saved,
    const at::Tensor& couplings) {
  TORCH_CHECK(
      s_saved.dim() == 4, "capsnet: s_saved must have 4 dimensions [B, r, N_out, D_out], got shape ",
      s_saved.sizes());
  const RoutingShape shape = check_forward_inputs(u, W, std::nullopt, s_saved.size(1));
  check_same_placement(s_saved, "s_saved", u);
  check_same_placement(grad_v, "grad_v", u);
  TORCH_CHECK(
      s_saved.size(0) == shape.batch && s_saved.size(2) == shape.num_out &&
          s_saved.size(3) == shape.dim_out,
      "capsnet: s_saved must have shape [B=", shape.batch, ", r, N_out=", shape.num_out,
      ", D_out=", shape.dim_out, "], got ", s_saved.sizes());
  check_same_placement(couplings, "couplings", u);
  TORCH_CHECK(
      couplings.dim() == 4 && couplings.size(0) == shape.batch &&
          couplings.size(1) == shape.iterations && couplings.size(2) == shape.num_out &&
          couplings.size(3) == shape.num_in,
      "capsnet: couplings must have shape [B, r, N_out, N_in] = [", shape.batch, ", ",
      shape.iterations, ", ", shape.num_out, ", ", shape.num_in, "], got ", couplings.sizes());
  TORCH_CHECK(
      grad_v.dim() == 3 && grad_v.size(0) == shape.batch && grad_v.size(1) == shape.num_out &&
          grad_v.size(2) == shape.dim_out,
      "capsnet: grad_v must have shape [B, N_out, D_out] = [", shape.batch, ", ", shape.num_out,
      ", ", shape.dim_out, "], got ", grad_v.sizes());
  return shape;
}

}  // namespace capsnet
