// The kernel launches of one routing_forward / routing_backward call, in order: which
// kernel runs, with which plan, for each iteration and option.
//
// Plain host C++ around the kernels, without ATen (only the c10 scalar types of the
// kernels), so that the translation units that instantiate the launches (the launch_*.cu
// files, routing_instances.h) compile without parsing ATen's headers. routing_host.h calls
// these after it has checked the arguments and allocated the tensors; the CUDA launcher
// (cuda_launcher.h) and the CPU emulator's (csrc/simt/emulated_routing.cpp) run them.
#pragma once

#include <type_traits>

#include "routing_gradients.cuh"
#include "routing_launch.h"

namespace capsnet::cuda {

// A kernel as a launcher sees it: its address, its name as written in the source (the
// emulator logs it, so that tests can check that every kernel ran) and its
// __launch_bounds__ (both launchers refuse a block larger than that: on a GPU such a
// launch fails).
template <typename Params>
struct KernelRef {
  void (*function)(Params);
  const char* name;
  int launch_bound;
};

template <typename Params>
KernelRef<Params> make_kernel_ref(void (*function)(Params), const char* name, int launch_bound) {
  return {function, name, launch_bound};
}

// CAPSNET_KERNEL(bound, kernel<args>) -> KernelRef. `bound` must be the expression the
// kernel's __launch_bounds__ names (tests/test_cuda_emulated.py checks that they match);
// variadic because template argument lists contain commas.
#define CAPSNET_KERNEL(bound, ...) ::capsnet::cuda::make_kernel_ref(&__VA_ARGS__, #__VA_ARGS__, bound)

// A Launcher is callable as launcher(KernelRef<Params>, const KernelLaunch&, const Params&)
// and runs the kernel once with that configuration, in stream order. (routing_host.h also
// asks it for the chunk trees' counters: launcher.tree_counters(numel, like).)

// c_0 = softmax over outputs of the logit prior, one launch.
template <typename scalar_t, typename Launcher>
void launch_prior_coupling(const Launcher& launch, const RoutingPlan& plan, const PriorParams<scalar_t>& p) {
  launch(CAPSNET_KERNEL(kColumnKernelMaxThreads, prior_coupling_kernel<scalar_t>), plan.prior_coupling, p);
}

// One launch per iteration: the partial sums over each input chunk meet in the chunk tree,
// whose last block per sample tile squashes (V_{k+1}, or v at the last iteration).
template <typename scalar_t, typename Launcher>
void launch_forward(const Launcher& launch, const RoutingPlan& plan, ForwardParams<scalar_t> p) {
  visit_tile(plan.tile, [&](auto tile) {
    using Tile = decltype(tile);
    for (int k = 0; k < plan.geometry.shape.iterations; ++k) {
      p.iteration = k;
      const KernelLaunch& config = plan.forward_iteration;
      if constexpr (std::is_same_v<scalar_t, float> && Tile::kLanes > 0) {
        if (plan.staging_slots == kInputRingSlots) {  // W and u through the InputRing
          if (k == 0 && p.prior_couplings == nullptr) {
            launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kUniformFirst, kInputRingSlots>), config, p);
          } else if (k == 0) {
            launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kPriorFirst, kInputRingSlots>), config, p);
          } else if (p.options.leaky) {
            launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kLaterLeaky, kInputRingSlots>), config, p);
          } else {
            launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kLater, kInputRingSlots>), config, p);
          }
          continue;
        }
      }
      if (k == 0 && p.prior_couplings == nullptr) {
        launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kUniformFirst>), config, p);
      } else if (k == 0) {
        launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kPriorFirst>), config, p);
      } else if (p.options.leaky) {
        launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kLaterLeaky>), config, p);
      } else {
        launch(CAPSNET_KERNEL(Tile::kMaxThreads, forward_iteration_kernel<scalar_t, Tile, ForwardStep::kLater>), config, p);
      }
    }
  });
}

// One pass of the backward sweep, with W and u through the InputRing when the plan gives
// the sweep one (float32 storage, CapsNet tile). `name` and `staged_name`: the two kernels as
// the launch log names them, the pass spelled out (CAPSNET_SWEEP_PASS).
template <SweepPass kPass, bool kLeaky, typename Tile, typename scalar_t, typename Launcher>
void launch_sweep_pass(const Launcher& launch, const RoutingPlan& plan, const BackwardParams<scalar_t>& p,
                       const char* name, const char* staged_name) {
  if constexpr (std::is_same_v<scalar_t, float> && Tile::kLanes > 0) {
    if (plan.sweep_staging_slots == kInputRingSlots) {
      auto kernel = CAPSNET_KERNEL(Tile::kMaxThreads, backward_sweep_kernel<scalar_t, Tile, kPass, kLeaky, kInputRingSlots>);
      kernel.name = staged_name;
      launch(kernel, plan.backward_sweep, p);
      return;
    }
  }
  auto kernel = CAPSNET_KERNEL(Tile::kMaxThreads, backward_sweep_kernel<scalar_t, Tile, kPass, kLeaky>);
  kernel.name = name;
  launch(kernel, plan.backward_sweep, p);
}

// launch_sweep_pass for `pass` (SweepPass::k...) and `leaky` (true or false), inside
// launch_backward.
#define CAPSNET_SWEEP_PASS(pass, leaky)                                                    \
  launch_sweep_pass<pass, leaky, Tile>(launch, plan, p,                                    \
      "backward_sweep_kernel<scalar_t, Tile, " #pass ", " #leaky ">",                      \
      "backward_sweep_kernel<scalar_t, Tile, " #pass ", " #leaky ", kInputRingSlots>")

// The reverse sweep (the per-sample state, c_m, G_m, gs_{m-1}), then dL/dW and dL/du (and
// dL/dbias, grad_prior) for one slice of the batch.
template <typename scalar_t, typename Launcher>
void launch_backward(const Launcher& launch, const RoutingPlan& plan, BackwardParams<scalar_t> p) {
  visit_tile(plan.tile, [&](auto tile) {
    using Tile = decltype(tile);
    const int last = int(plan.geometry.shape.iterations) - 1;
    p.iteration = last;
    const bool leaky = p.options.leaky;
    if (last == 0) {  // gs_0 from grad_v, no couplings to recompute
      launch(CAPSNET_KERNEL(Tile::kMaxThreads, backward_output_kernel<scalar_t, Tile>), plan.backward_output, p);
    } else if (p.options.detach_routing) {  // the state and c_{r-1}
      if (leaky) {
        CAPSNET_SWEEP_PASS(SweepPass::kCouplingsOnly, true);
      } else {
        CAPSNET_SWEEP_PASS(SweepPass::kCouplingsOnly, false);
      }
    } else {  // the state, c_{r-1}, G_{r-1}, gs_{r-2}; then c_m, G_m, gs_{m-1}
      if (leaky) {
        CAPSNET_SWEEP_PASS(SweepPass::kFirstLogitGrads, true);
      } else {
        CAPSNET_SWEEP_PASS(SweepPass::kFirstLogitGrads, false);
      }
      for (int m = last - 1; m >= 1; --m) {
        p.iteration = m;
        if (leaky) {
          CAPSNET_SWEEP_PASS(SweepPass::kLogitGrads, true);
        } else {
          CAPSNET_SWEEP_PASS(SweepPass::kLogitGrads, false);
        }
      }
    }
    if (p.grad_prior != nullptr) {
      p.iteration = 0;  // G_0
      CAPSNET_SWEEP_PASS(SweepPass::kPriorGrads, false);
    }
    if constexpr (Tile::kLanes > 0) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (plan.gradient_rows == kWideGradientRows) {  // 8 rows, one sample's loads at a time
          launch(CAPSNET_KERNEL(kGradientMaxThreads<kWideGradientRows>, gradient_kernel<scalar_t, Tile, kWideGradientRows>),
              plan.gradients, p);
        } else if (plan.gradient_loads_ahead) {  // 4 rows, a round's loads in flight together and ahead
          launch(CAPSNET_KERNEL(kGradientMaxThreads<kNarrowGradientRows>, gradient_kernel<scalar_t, Tile, kNarrowGradientRows, true>),
              plan.gradients, p);
        } else {  // 4 rows, each term and u row loaded where it is used
          launch(CAPSNET_KERNEL(kGradientMaxThreads<kNarrowGradientRows>, gradient_kernel<scalar_t, Tile, kNarrowGradientRows, false>),
              plan.gradients, p);
        }
        return;
      }
      launch(CAPSNET_KERNEL(kGradientMaxThreads<kDefaultGradientRows>, gradient_kernel<scalar_t, Tile>), plan.gradients, p);
    } else {
      launch(CAPSNET_KERNEL(kGradWeightMaxThreads, grad_weight_kernel<scalar_t, Tile>), plan.grad_weight, p);
      launch(CAPSNET_KERNEL(Tile::kMaxThreads, grad_input_kernel<scalar_t, Tile>), plan.grad_input, p);
    }
  });
}

#undef CAPSNET_SWEEP_PASS

}  // namespace capsnet::cuda
