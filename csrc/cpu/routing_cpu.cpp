// Fused dynamic routing on the CPU: the ATen side of the kernels, registered for the CPU
// dispatch key. Checks the arguments, converts float16/bfloat16 inputs to float32 (the
// op-math type: all arithmetic is in float or double), lays the inputs out in blocks of
// input capsules (block_layout.h), splits the work over ATen's thread pool and calls the
// compute kernels of the instruction-set variant chosen for this CPU (kernel_dispatch.h).
//
// Forward, per task of a few samples (in parallel): predictions u_hat = W u for the task's
// samples in one sweep over W, then each sample's routing iterations. Saves only
// s_saved [B, r, N_out, D_out].
//
// Backward, in chunks of samples whose number depends only on the shape (so that results
// are the same for any number of threads), two deterministic phases per chunk (no atomics,
// no reduction whose order depends on the threads):
//   phase 1, per sample (in parallel): recompute u_hat and the couplings of every iteration
//     (the same code as the forward: bitwise the same), sweep the iterations in reverse and
//     write grad u_hat as a short sum of coefficient planes times vectors (BackwardTerms);
//   phase 2, per block of input capsules (in parallel), samples in order: rebuild grad u_hat
//     and accumulate grad u, grad W and grad logit_prior.
// The chunk's planes are the only batch-proportional scratch; the chunk is sized so that
// they stay within kChunkBudgetBytes. Under detach_routing the couplings are constants: two
// vectors per sample, then one pass per block of input capsules (kernels/backward_detached.h).
// Scratch comes from a cache kept between calls (scratch.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cpu/block_layout.h"
#include "cpu/kernel_dispatch.h"
#include "cpu/kernel_interface.h"
#include "cpu/scratch.h"
#include "routing_checks.h"
#include "routing_math.h"

namespace capsnet {
namespace cpu {
namespace {

// Upper bound of the backward's per-chunk coefficient planes.
constexpr int64_t kChunkBudgetBytes = int64_t(256) << 20;

template <typename T>
const RoutingKernels<T>& kernels_of(const KernelVariant& variant);
template <>
const RoutingKernels<float>& kernels_of<float>(const KernelVariant& variant) {
  return variant.f32;
}
template <>
const RoutingKernels<double>& kernels_of<double>(const KernelVariant& variant) {
  return variant.f64;
}

template <typename T>
constexpr at::ScalarType scalar_type_of() {
  return c10::CppTypeToScalarType<T>::value;
}

// Runs task(index, workspace) for index in [0, count) over ATen's threads, with one
// workspace of `workspace_size` elements per thread.
template <typename T, typename Task>
void parallel_tasks(int64_t count, int64_t workspace_size, const Task& task) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    const Scratch workspace(workspace_size, scalar_type_of<T>());
    for (int64_t index = begin; index < end; ++index) {
      task(index, workspace.data<T>());
    }
  });
}

at::Tensor compute_contiguous(const at::Tensor& t, at::ScalarType compute_dtype) {
  return t.to(compute_dtype).contiguous();
}

// The inputs in the kernels' block layouts (block_layout.h), for one call.
template <typename T>
struct BlockedInputs {
  Scratch u, W, prior;
  bool has_prior;

  BlockedInputs(const RoutingShape& shape, const at::Tensor& u_in, const at::Tensor& W_in, const at::Tensor& prior_in)
      : u(shape.batch * blocks(shape) * shape.dim_in * capsule_block<T>(), scalar_type_of<T>()),
        W(blocks(shape) * shape.out_size() * shape.dim_in * capsule_block<T>(), scalar_type_of<T>()),
        prior(prior_in.defined() ? blocks(shape) * shape.num_out * capsule_block<T>() : 0, scalar_type_of<T>()),
        has_prior(prior_in.defined()) {
    constexpr int64_t kBlock = capsule_block<T>();
    block_inputs(u_in.const_data_ptr<T>(), u.data<T>(), shape.batch, shape.num_in, shape.dim_in, kBlock);
    block_weights(W_in.const_data_ptr<T>(), W.data<T>(), shape.num_in, shape.out_size() * shape.dim_in, kBlock);
    if (has_prior) {
      block_prior(prior_in.const_data_ptr<T>(), prior.data<T>(), shape.num_in, shape.num_out, kBlock);
    }
  }
  static int64_t blocks(const RoutingShape& shape) {
    return num_capsule_blocks(shape.num_in, capsule_block<T>());
  }
  const T* prior_or_null() const {
    return has_prior ? prior.data<T>() : nullptr;
  }
};

template <typename T>
void run_forward(
    const RoutingShape& shape, const RoutingOptions& options, const at::Tensor& u, const at::Tensor& W,
    const at::Tensor& bias, const at::Tensor& prior, at::Tensor& v, at::Tensor& s_saved, at::Tensor& couplings) {
  const RoutingKernels<T>& kernels = kernels_of<T>(chosen_kernel_variant());
  const BlockedInputs<T> blocked(shape, u, W, prior);
  ForwardProblem<T> problem{
      shape,
      options,
      blocked.u.template data<T>(),
      blocked.W.template data<T>(),
      bias.defined() ? bias.const_data_ptr<T>() : nullptr,
      blocked.prior_or_null(),
      v.mutable_data_ptr<T>(),
      s_saved.mutable_data_ptr<T>(),
      couplings.defined() ? couplings.mutable_data_ptr<T>() : nullptr,
  };
  const int64_t per_task = kernels.samples_per_task(shape);
  const int64_t tasks = (shape.batch + per_task - 1) / per_task;
  parallel_tasks<T>(tasks, kernels.sample_workspace_size(shape), [&](int64_t task, T* workspace) {
    const int64_t begin = task * per_task;
    kernels.forward(problem, begin, std::min(begin + per_task, shape.batch), workspace);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_forward_cpu(
    const at::Tensor& u_in, const at::Tensor& W_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& prior_in, int64_t num_iterations, bool leaky, bool detach_routing,
    bool return_couplings) {
  const RoutingShape shape = check_forward_inputs(u_in, W_in, bias_in, prior_in, num_iterations);
  const RoutingOptions options{leaky, detach_routing};
  const at::ScalarType dtype = u_in.scalar_type();
  const at::ScalarType compute_dtype = saved_state_dtype(dtype);
  const at::TensorOptions compute = u_in.options().dtype(compute_dtype);
  at::Tensor v = at::empty({shape.batch, shape.num_out, shape.dim_out}, compute);
  at::Tensor s_saved = at::empty({shape.batch, shape.iterations, shape.num_out, shape.dim_out}, compute);
  at::Tensor couplings =
      return_couplings ? at::empty({shape.batch, shape.num_in, shape.num_out}, compute) : at::Tensor();
  if (shape.batch > 0) {
    const at::Tensor u = compute_contiguous(u_in, compute_dtype);
    const at::Tensor W = compute_contiguous(W_in, compute_dtype);
    const at::Tensor bias = bias_in.has_value() ? compute_contiguous(*bias_in, compute_dtype) : at::Tensor();
    const at::Tensor prior = prior_in.has_value() ? compute_contiguous(*prior_in, compute_dtype) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(compute_dtype, "capsnet_routing_forward_cpu", [&] {
      run_forward<scalar_t>(shape, options, u, W, bias, prior, v, s_saved, couplings);
    });
  }
  return {
      v.to(dtype),
      s_saved,
      return_couplings ? couplings.to(dtype) : at::empty({0}, u_in.options()),
  };
}

// Samples per backward chunk: as many as fit kChunkBudgetBytes of phase-1 results (at least
// one). A function of the shape alone, never of the thread count.
int64_t backward_chunk_samples(
    const RoutingShape& shape, const BackwardTerms& terms, int64_t block, int64_t element_size) {
  const int64_t blocks = num_capsule_blocks(shape.num_in, block);
  const int64_t per_sample =
      (blocks * terms.planes() * shape.num_out * block + terms.vectors() * shape.out_size()) * element_size;
  return std::max<int64_t>(1, std::min(shape.batch, kChunkBudgetBytes / per_sample));
}

// The full backward: two phases per chunk of samples.
template <typename T>
void run_backward_phases(const RoutingKernels<T>& kernels, BackwardProblem<T>& problem) {
  const RoutingShape& shape = problem.shape;
  constexpr int64_t kBlock = capsule_block<T>();
  const int64_t blocks = num_capsule_blocks(shape.num_in, kBlock);
  const BackwardTerms& terms = problem.terms;
  const int64_t chunk = backward_chunk_samples(shape, terms, kBlock, sizeof(T));
  const Scratch planes(chunk * blocks * terms.planes() * shape.num_out * kBlock, scalar_type_of<T>());
  const Scratch vectors(chunk * terms.vectors() * shape.out_size(), scalar_type_of<T>());
  problem.chunk_samples = chunk;
  problem.planes = planes.data<T>();
  problem.vectors = vectors.data<T>();
  const int64_t per_task = kernels.samples_per_task(shape);
  const int64_t sample_workspace = kernels.sample_workspace_size(shape);
  const int64_t block_workspace = kernels.block_workspace_size(shape);
  for (int64_t chunk_begin = 0; chunk_begin < shape.batch; chunk_begin += chunk) {
    const int64_t chunk_end = std::min(chunk_begin + chunk, shape.batch);
    const int64_t tasks = (chunk_end - chunk_begin + per_task - 1) / per_task;
    parallel_tasks<T>(tasks, sample_workspace, [&](int64_t task, T* workspace) {
      const int64_t begin = chunk_begin + task * per_task;
      kernels.backward_samples(problem, chunk_begin, begin, std::min(begin + per_task, chunk_end), workspace);
    });
    parallel_tasks<T>(blocks, block_workspace, [&](int64_t block, T* workspace) {
      kernels.backward_block(problem, block, chunk_begin, chunk_end, chunk_begin == 0, workspace);
    });
  }
}

// detach_routing: two vectors per sample, then one pass per block over the whole batch.
template <typename T>
void run_backward_detached(const RoutingKernels<T>& kernels, BackwardProblem<T>& problem) {
  const RoutingShape& shape = problem.shape;
  constexpr int64_t kVectorSamplesPerTask = 16;
  const Scratch vectors(shape.batch * 2 * shape.out_size(), scalar_type_of<T>());
  problem.chunk_samples = shape.batch;
  problem.vectors = vectors.data<T>();
  parallel_tasks<T>((shape.batch + kVectorSamplesPerTask - 1) / kVectorSamplesPerTask, shape.out_size(), [&](int64_t task, T* workspace) {
    const int64_t begin = task * kVectorSamplesPerTask;
    kernels.detached_samples(problem, begin, std::min(begin + kVectorSamplesPerTask, shape.batch), workspace);
  });
  parallel_tasks<T>(
      num_capsule_blocks(shape.num_in, capsule_block<T>()), kernels.detached_block_workspace_size(shape),
      [&](int64_t block, T* workspace) { kernels.detached_block(problem, block, workspace); });
}

template <typename T>
void run_backward(
    const RoutingShape& shape, const RoutingOptions& options, const at::Tensor& grad_v, const at::Tensor& u,
    const at::Tensor& W, const at::Tensor& prior, const at::Tensor& s_saved, at::Tensor& grad_u,
    at::Tensor& grad_W, at::Tensor& grad_bias, T* grad_prior_blocked) {
  const RoutingKernels<T>& kernels = kernels_of<T>(chosen_kernel_variant());
  const BlockedInputs<T> blocked(shape, u, W, prior);
  const Scratch grad_s_sum(shape.batch * shape.out_size(), scalar_type_of<T>());
  BackwardProblem<T> problem{
      shape,
      options,
      backward_terms(shape, blocked.has_prior),
      blocked.u.template data<T>(),
      blocked.W.template data<T>(),
      blocked.prior_or_null(),
      s_saved.const_data_ptr<T>(),
      grad_v.const_data_ptr<T>(),
      /*chunk_samples=*/0,
      /*planes=*/nullptr,
      /*vectors=*/nullptr,
      grad_s_sum.data<T>(),
      grad_u.mutable_data_ptr<T>(),
      grad_W.mutable_data_ptr<T>(),
      grad_prior_blocked,
  };
  if (options.detach_routing) {
    run_backward_detached(kernels, problem);
  } else {
    run_backward_phases(kernels, problem);
  }
  // grad bias = sum over samples of their sum over iterations of grad s, samples in order.
  const T* per_sample = grad_s_sum.data<T>();
  T* total = grad_bias.mutable_data_ptr<T>();
  const int64_t out_size = shape.out_size();
  std::fill_n(total, out_size, T(0));
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t k = 0; k < out_size; ++k) {
      total[k] += per_sample[b * out_size + k];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_backward_cpu(
    const at::Tensor& grad_v_in, const at::Tensor& u_in, const at::Tensor& W_in,
    const std::optional<at::Tensor>& prior_in, const at::Tensor& s_saved_in, bool leaky, bool detach_routing) {
  const RoutingShape shape = check_backward_inputs(grad_v_in, u_in, W_in, prior_in, s_saved_in);
  const RoutingOptions options{leaky, detach_routing};
  const at::ScalarType dtype = u_in.scalar_type();
  const at::ScalarType compute_dtype = saved_state_dtype(dtype);
  const at::TensorOptions compute = u_in.options().dtype(compute_dtype);
  const bool prior_gradient = prior_in.has_value() && !detach_routing;
  at::Tensor grad_u = at::empty({shape.batch, shape.num_in, shape.dim_in}, compute);
  at::Tensor grad_W = shape.batch > 0 ? at::empty(W_in.sizes(), compute) : at::zeros(W_in.sizes(), compute);
  at::Tensor grad_bias = at::zeros({shape.num_out, shape.dim_out}, compute);
  at::Tensor grad_prior = prior_gradient ? at::zeros({shape.num_in, shape.num_out}, compute) : at::Tensor();
  if (shape.batch > 0) {
    const at::Tensor grad_v = compute_contiguous(grad_v_in, compute_dtype);
    const at::Tensor u = compute_contiguous(u_in, compute_dtype);
    const at::Tensor W = compute_contiguous(W_in, compute_dtype);
    const at::Tensor prior = prior_in.has_value() ? compute_contiguous(*prior_in, compute_dtype) : at::Tensor();
    const at::Tensor s_saved = s_saved_in.contiguous();
    AT_DISPATCH_FLOATING_TYPES(compute_dtype, "capsnet_routing_backward_cpu", [&] {
      constexpr int64_t kBlock = capsule_block<scalar_t>();
      const Scratch grad_prior_blocked(
          prior_gradient ? num_capsule_blocks(shape.num_in, kBlock) * shape.num_out * kBlock : 0, compute_dtype);
      run_backward<scalar_t>(
          shape, options, grad_v, u, W, prior, s_saved, grad_u, grad_W, grad_bias,
          prior_gradient ? grad_prior_blocked.data<scalar_t>() : nullptr);
      if (prior_gradient) {
        unblock_prior(
            grad_prior_blocked.data<scalar_t>(), grad_prior.mutable_data_ptr<scalar_t>(), shape.num_in, shape.num_out,
            kBlock);
      }
    });
  }
  return {
      grad_u.to(dtype),
      grad_W.to(dtype),
      grad_bias.to(dtype),
      prior_gradient ? grad_prior.to(dtype) : at::empty({0}, u_in.options()),
  };
}

}  // namespace

TORCH_LIBRARY_IMPL(capsnet, CPU, m) {
  m.impl("routing_forward", &routing_forward_cpu);
  m.impl("routing_backward", &routing_backward_cpu);
}

}  // namespace cpu
}  // namespace capsnet
