// The CPU routing kernels of one instruction-set variant: compiled once per variant by
// setup.py (-DCAPSNET_CPU_VARIANT=<name> and that variant's -march), never on its own.
// The driver (csrc/cpu/routing_cpu.cpp) reaches them only through the table below, after
// kernel_dispatch.cpp has checked that this CPU can run them.

// No ATen headers here (see routing_math.h): nothing in this object may run at load time.
#define CAPSNET_ROUTING_MATH_WITHOUT_ATEN

#include "cpu/kernel_interface.h"
#include "cpu/kernels/backward_block.h"
#include "cpu/kernels/backward_detached.h"
#include "cpu/kernels/backward_samples.h"
#include "cpu/kernels/forward.h"
#include "cpu/kernels/variant.h"
#include "cpu/kernels/workspace.h"

#define CAPSNET_STRINGIFY_(x) #x
#define CAPSNET_STRINGIFY(x) CAPSNET_STRINGIFY_(x)

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {
namespace {

// The kernels specialised for D_in = 8 (CapsNet) or for any D_in.
template <typename T>
void forward_any(const ForwardProblem<T>& p, int64_t begin, int64_t end, T* workspace) {
  if (p.shape.dim_in == 8) {
    forward_samples<T, 8>(p, begin, end, workspace);
  } else {
    forward_samples<T, 0>(p, begin, end, workspace);
  }
}

template <typename T>
void backward_samples_any(
    const BackwardProblem<T>& p, int64_t chunk_begin, int64_t begin, int64_t end, T* workspace) {
  if (p.shape.dim_in == 8) {
    backward_samples<T, 8>(p, chunk_begin, begin, end, workspace);
  } else {
    backward_samples<T, 0>(p, chunk_begin, begin, end, workspace);
  }
}

template <typename T>
void backward_block_any(
    const BackwardProblem<T>& p, int64_t block, int64_t begin, int64_t end, bool first_chunk, T* workspace) {
  if (p.shape.dim_in == 8) {
    backward_block<T, 8>(p, block, begin, end, first_chunk, workspace);
  } else {
    backward_block<T, 0>(p, block, begin, end, first_chunk, workspace);
  }
}

template <typename T>
void detached_block_any(const BackwardProblem<T>& p, int64_t block, T* workspace) {
  if (p.shape.dim_in == 8) {
    detached_block<T, 8>(p, block, workspace);
  } else {
    detached_block<T, 0>(p, block, workspace);
  }
}

template <typename T>
int64_t detached_block_workspace_size(const RoutingShape& shape) {
  return DetachedWorkspace<T>(nullptr, shape).size;
}

template <typename T>
int64_t sample_workspace_size(const RoutingShape& shape) {
  return SampleWorkspace<T>(nullptr, shape).size;
}

template <typename T>
int64_t block_workspace_size(const RoutingShape& shape) {
  return BlockWorkspace<T>(nullptr, shape).size;
}

template <typename T>
constexpr RoutingKernels<T> kernels_for() {
  return {&samples_per_task<T>,
          &sample_workspace_size<T>,
          &forward_any<T>,
          &backward_samples_any<T>,
          &block_workspace_size<T>,
          &backward_block_any<T>,
          &detached_sample_vectors<T>,
          &detached_block_workspace_size<T>,
          &detached_block_any<T>};
}

// Constant-initialised (no code runs at load time in this object).
constexpr KernelVariant kVariant{CAPSNET_STRINGIFY(CAPSNET_CPU_VARIANT), kernels_for<float>(), kernels_for<double>()};

}  // namespace

const KernelVariant& kernel_variant() {
  return kVariant;
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
