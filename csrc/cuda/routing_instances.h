// The kernel launches of routing_launches.h for the CUDA launcher, one scalar type and one
// direction per translation unit.
//
// Each launch function instantiates every kernel it can launch, for both tile classes: 9
// forward and 19 backward kernels per scalar type, heavily unrolled. In one file they were
// one serial nvcc job of about 4 minutes per GPU architecture; in the launch_*.cu files
// (one explicit instantiation each, no ATen headers) they compile in parallel, MAX_JOBS at
// a time, 20 to 50 s each per architecture (docs/CUDA.md, "Build time"). routing_kernel.cu
// sees them as `extern template` and compiles none of them.
#pragma once

#include "cuda_launcher.h"
#include "routing_launches.h"

// CAPSNET_FORWARD_LAUNCHES(template, float) instantiates the forward launches of float;
// CAPSNET_FORWARD_LAUNCHES(extern template, float) declares them.
#define CAPSNET_FORWARD_LAUNCHES(INSTANCE, scalar_t)                                                          \
  INSTANCE void launch_forward<scalar_t, CudaLauncher>(const CudaLauncher&, const RoutingPlan&,              \
      ForwardParams<scalar_t>);                                                                               \
  INSTANCE void launch_prior_coupling<scalar_t, CudaLauncher>(const CudaLauncher&, const RoutingPlan&,       \
      const PriorParams<scalar_t>&);

#define CAPSNET_BACKWARD_LAUNCHES(INSTANCE, scalar_t) \
  INSTANCE void launch_backward<scalar_t, CudaLauncher>(const CudaLauncher&, const RoutingPlan&, BackwardParams<scalar_t>);

// The types of CAPSNET_DISPATCH_ROUTING_TYPES (routing_host.h).
#define CAPSNET_FOR_EACH_ROUTING_TYPE(LAUNCHES, INSTANCE) \
  LAUNCHES(INSTANCE, float)                               \
  LAUNCHES(INSTANCE, double)                              \
  LAUNCHES(INSTANCE, c10::Half)                           \
  LAUNCHES(INSTANCE, c10::BFloat16)
