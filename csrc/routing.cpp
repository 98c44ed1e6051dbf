// Operator schemas of the fused dynamic-routing op (one op per direction).
//
// The kernels register themselves per backend: cpu/routing_kernel.cpp (CPU) and
// cuda/routing_kernel.cu (CUDA). Autograd and the fake (meta) implementation are
// registered from Python in capsnet/ops.py.
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
  // v:         [B, N_out, D_out]          routed output capsules
  // s_saved:   [B, r, N_out, D_out]       total input s of every iteration, before squash
  // couplings: [B, r, N_out, N_in]        coupling coefficients c[i, j] of every iteration,
  //                                       input capsules innermost (the kernels vectorise
  //                                       over i)
  // s_saved and couplings are the state backward needs besides u and W (u_hat is
  // recomputed from u and W).
  m.def(
      "routing_forward(Tensor u, Tensor W, Tensor? bias, int num_iterations) "
      "-> (Tensor v, Tensor s_saved, Tensor couplings)",
      {at::Tag::pt2_compliant_tag});
  // Returns (grad_u, grad_W, grad_bias); grad_bias is [N_out, D_out] whether or not the
  // forward had a bias (the bias only enters s, which s_saved already holds).
  m.def(
      "routing_backward(Tensor grad_v, Tensor u, Tensor W, Tensor s_saved, Tensor couplings) "
      "-> (Tensor grad_u, Tensor grad_W, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
}
