// Operator schemas of the fused dynamic-routing op (one op per direction).
//
// The kernels register themselves per backend (the CPU kernels under csrc/cpu, the CUDA
// kernels under csrc/cuda). Autograd, the fake (meta) implementation and the autocast rule
// are registered from Python in capsnet/ops.py. The math both backends share is in
// routing_math.h; the argument checks in routing_checks.h.
#include <Python.h>
#include <torch/library.h>

// `import capsnet._C` loads this shared object, which runs the TORCH_LIBRARY static
// initialisers below; the module itself has no Python-visible members.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Fused dynamic-routing kernels, registered as torch.ops.capsnet.*",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(capsnet, m) {
  // Inputs (one dtype for all: float16, bfloat16, float32 or float64; one device):
  //   u [B, N_in, D_in], W [N_in, N_out, D_out, D_in], bias [N_out, D_out] or None,
  //   logit_prior [N_in, N_out] or None (the initial routing logits of every sample; zeros
  //   when None), num_iterations r >= 1, leaky (Sec. 7 leaky routing: an extra logit 0
  //   per input capsule whose coupling is dropped), detach_routing (how gradients flow, see
  //   routing_backward: the forward's values do not depend on it, and the kernels ignore it;
  //   autograd reads it), return_couplings.
  // Outputs:
  //   v          [B, N_out, D_out]     routed output capsules, dtype of u
  //   s_saved    [B, r, N_out, D_out]  total input s of every iteration before squash, in
  //                                    the op-math dtype (float32 for float16/bfloat16
  //                                    inputs): all the state backward needs besides the
  //                                    inputs, which recomputes u_hat and the couplings
  //   couplings  [B, N_in, N_out]      the last iteration's couplings c_ij when
  //                                    return_couplings, else an empty [0] tensor; dtype of u
  m.def(
      "routing_forward(Tensor u, Tensor W, Tensor? bias, Tensor? logit_prior, int num_iterations, "
      "bool leaky, bool detach_routing, bool return_couplings) "
      "-> (Tensor v, Tensor s_saved, Tensor couplings)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of the forward with the same u, W, logit_prior and leaky (the bias only enters
  // s, which s_saved holds). detach_routing: the couplings of every iteration are constants,
  // so gradients flow only through the last iteration's weighted sum and squash.
  // Returns, in the dtype of u:
  //   grad_u [B, N_in, D_in], grad_W [N_in, N_out, D_out, D_in], grad_bias [N_out, D_out]
  //   (whether or not the forward had a bias), and grad_prior [N_in, N_out] when a
  //   logit_prior is given and detach_routing is false, else an empty [0] tensor.
  m.def(
      "routing_backward(Tensor grad_v, Tensor u, Tensor W, Tensor? logit_prior, Tensor s_saved, "
      "bool leaky, bool detach_routing) "
      "-> (Tensor grad_u, Tensor grad_W, Tensor grad_bias, Tensor grad_prior)",
      {at::Tag::pt2_compliant_tag});
}
