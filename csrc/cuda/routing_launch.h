// Launch planning for the CUDA routing kernels: tile class, work partition, grid, block and
// shared-memory sizes, workspace sizes.
//
// Plain host C++ (no CUDA, no ATen), shared by the real launcher (routing_kernel.cu), the
// emulated one (csrc/simt/emulated_routing.cpp) and the static performance model
// (benchmarks/cuda_model.py reads the plan through the emulator module): all use the very
// same plan.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "routing_layout.h"

namespace capsnet::cuda {

// What the planner needs to know about the GPU.
struct DeviceLimits {
  int64_t multiprocessor_count;
  int64_t max_threads_per_block;
  int64_t max_shared_bytes_per_block;  // without the opt-in for more than 48 KiB
};

// An H100 SXM: what the emulator plans for unless a test asks for another count of SMs.
constexpr DeviceLimits kH100Limits{132, 1024, 48 * 1024};

enum class TileKind { kCapsNet, kGeneric };

inline const char* tile_name(TileKind tile) {
  return tile == TileKind::kCapsNet ? "CapsNetTile" : "GenericTile";
}

// Calls f(CapsNetTile{}) or f(GenericTile{}): turns the planner's choice into a template argument.
template <typename F>
void visit_tile(TileKind tile, F&& f) {
  if (tile == TileKind::kCapsNet) {
    f(CapsNetTile{});
  } else {
    f(GenericTile{});
  }
}

struct LaunchDims {
  unsigned x = 1;
  unsigned y = 1;
  unsigned z = 1;
};

struct KernelLaunch {
  LaunchDims grid;
  LaunchDims block;
  size_t shared_bytes = 0;
};

struct RoutingPlan {
  RoutingGeometry geometry;  // the shape with the partition filled in
  TileKind tile;
  KernelLaunch prior_coupling;
  KernelLaunch forward_partial_sums;
  KernelLaunch backward_partial_sums;
  KernelLaunch squash;  // forward_squash_kernel and backward_squash_kernel
  KernelLaunch grad_weight;
  KernelLaunch grad_input;
  KernelLaunch grad_bias;
  // Workspace sizes in elements of the op-math type.
  int64_t partials_numel;               // [B, num_chunks, J, D]
  int64_t forward_agreement_numel;      // [B, J, D]
  int64_t backward_agreement_numel;     // [B, r, J, D]
  int64_t terms_numel;                  // [B, terms, J, D]
  int64_t coefficients_numel;           // [slots, I, J, B]
};

// Planning policy. The numbers aim at keeping every SM busy with a few blocks while each
// block does enough work to amortise its fixed costs (docs/CUDA.md, "Launch plan").
constexpr int64_t kRoutingBlocksPerMultiprocessor = 2;
constexpr int64_t kMinInputsPerChunk = 16;
constexpr int64_t kGradWeightWarpsPerMultiprocessor = 24;
constexpr int64_t kGradInputSharedBudget = 32 * 1024;
constexpr int64_t kGradBiasSampleGroups = 8;

namespace plan_detail {
inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
inline int64_t clamp(int64_t value, int64_t low, int64_t high) {
  return value < low ? low : (value > high ? high : value);
}
inline int64_t smallest(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline int64_t largest_of(int64_t a, int64_t b) {
  return a < b ? b : a;
}
inline int64_t max_routing_threads(TileKind tile, const DeviceLimits& limits) {
  const int64_t tile_limit = tile == TileKind::kCapsNet ? CapsNetTile::kMaxThreads : GenericTile::kMaxThreads;
  return smallest(tile_limit, limits.max_threads_per_block);
}
}  // namespace plan_detail

// Empty when the CUDA kernels handle the shape; otherwise the reason, for a TORCH_CHECK.
inline std::string unsupported_shape_reason(const RoutingShape& shape, const DeviceLimits& limits) {
  const std::string fallback = "; use dynamic_routing(..., backend='reference') for this shape on the GPU";
  if (shape.dim_out > GenericTile::kMaxDimOut) {
    return "capsnet CUDA kernels support D_out <= " + std::to_string(GenericTile::kMaxDimOut) +
        ", got D_out = " + std::to_string(shape.dim_out) + " (W.size(2))" + fallback;
  }
  if (shape.dim_in > GenericTile::kMaxDimIn) {
    return "capsnet CUDA kernels support D_in <= " + std::to_string(GenericTile::kMaxDimIn) +
        ", got D_in = " + std::to_string(shape.dim_in) + " (u.size(2))" + fallback;
  }
  const int64_t max_out = plan_detail::max_routing_threads(TileKind::kGeneric, limits);
  if (shape.num_out > max_out) {
    return "capsnet CUDA kernels support N_out <= " + std::to_string(max_out) +
        " (one thread per output capsule), got N_out = " + std::to_string(shape.num_out) + " (W.size(1))" +
        fallback;
  }
  // The kernels index the backward's workspaces and u with 32-bit offsets; the largest is
  // the coefficient workspace, [2r - 1, N_in, N_out, B] at most.
  const int64_t largest = plan_detail::largest_of(
      (2 * shape.iterations - 1) * shape.num_in * shape.num_out * shape.batch,
      shape.batch * (2 * shape.iterations - 1) * shape.num_out * shape.dim_out);
  const int64_t limit = int64_t(1) << 31;
  if (largest >= limit || shape.batch * shape.num_in * shape.dim_in >= limit ||
      shape.num_in * shape.num_out * shape.dim_out * shape.dim_in >= limit) {
    return "capsnet CUDA kernels index with 32-bit offsets: (2 r - 1) * N_in * N_out * B, B * N_in * D_in and "
           "the number of elements of W must stay below 2^31 (split the batch)" + fallback;
  }
  return "";
}

// The plan for one call with batch >= 1 on a shape that unsupported_shape_reason accepts.
// acc_bytes: the size of the op-math type (workspaces and shared memory are in it).
inline RoutingPlan plan_routing(
    const RoutingShape& shape, bool has_prior, bool detach_routing, int64_t acc_bytes, const DeviceLimits& limits) {
  using plan_detail::ceil_div;
  using plan_detail::clamp;
  using plan_detail::smallest;
  RoutingPlan plan{};
  plan.geometry.shape = shape;
  RoutingPartition& part = plan.geometry.part;
  const int64_t batch = shape.batch, num_in = shape.num_in, num_out = shape.num_out;
  const int64_t dim_out = shape.dim_out, dim_in = shape.dim_in, iterations = shape.iterations;

  // Tile class: the fast one whenever the shape fits it.
  const bool fits_capsnet_tile = dim_in == CapsNetTile::kMaxDimIn && dim_out == CapsNetTile::kMaxDimOut &&
      num_out <= CapsNetTile::kMaxNumOut &&
      num_out * CapsNetTile::kLanes <= plan_detail::max_routing_threads(TileKind::kCapsNet, limits);
  plan.tile = fits_capsnet_tile ? TileKind::kCapsNet : TileKind::kGeneric;
  const int64_t max_dim_in = fits_capsnet_tile ? CapsNetTile::kMaxDimIn : GenericTile::kMaxDimIn;
  const int64_t weight_rows = fits_capsnet_tile ? CapsNetTile::kGradWeightRows : GenericTile::kGradWeightRows;

  // Routing kernels: block (lanes, J), consecutive samples of one output capsule side by
  // side in a warp, so that they read the same W row. The CapsNet tile's lane count is a
  // compile-time constant (lanes past the batch idle); otherwise up to a warp.
  const int64_t max_threads = plan_detail::max_routing_threads(plan.tile, limits);
  part.samples_per_block = fits_capsnet_tile
      ? CapsNetTile::kLanes
      : int(clamp(max_threads / num_out, 1, smallest(kWarpSize, batch)));
  const int64_t sample_tiles = ceil_div(batch, part.samples_per_block);
  // As many input chunks as it takes to give every SM a few blocks, but at least
  // kMinInputsPerChunk inputs per block (to amortise a block's fixed work).
  const int64_t wanted_chunks = ceil_div(kRoutingBlocksPerMultiprocessor * limits.multiprocessor_count, sample_tiles);
  const int64_t min_inputs = smallest(kMinInputsPerChunk, num_in);
  part.inputs_per_chunk = clamp(ceil_div(num_in, wanted_chunks), min_inputs, num_in);
  part.num_chunks = ceil_div(num_in, part.inputs_per_chunk);

  const BackwardTerms terms{iterations, detach_routing, has_prior};
  part.terms = terms.count();
  part.coefficient_slots = terms.slots();

  const int64_t thread_values_bytes = num_out * part.samples_per_block * acc_bytes;  // one value per thread
  const LaunchDims routing_grid{unsigned(sample_tiles), unsigned(part.num_chunks), 1};
  const LaunchDims routing_block{unsigned(part.samples_per_block), unsigned(num_out), 1};
  const int64_t exchange = fits_capsnet_tile
      ? exchange_elements<CapsNetTile>(num_out, part.samples_per_block, int(acc_bytes))
      : exchange_elements<GenericTile>(num_out, part.samples_per_block, int(acc_bytes));
  const size_t exchange_bytes = size_t(exchange * acc_bytes);
  plan.forward_partial_sums = {routing_grid, routing_block, exchange_bytes};
  const int64_t routing_threads = num_out * part.samples_per_block;
  const int64_t thread_rows = fits_capsnet_tile ? thread_row_elements<CapsNetTile>(routing_threads, int(acc_bytes))
                                                : thread_row_elements<GenericTile>(routing_threads, int(acc_bytes));
  plan.backward_partial_sums = {routing_grid, routing_block, exchange_bytes + size_t(thread_rows * acc_bytes)};

  // grad_input_kernel sums over j in shared memory [slice][J][lanes].
  part.grad_input_slice = int(clamp(kGradInputSharedBudget / thread_values_bytes, 1, dim_in));
  plan.grad_input = {routing_grid, routing_block, size_t(part.grad_input_slice * thread_values_bytes)};

  // Per-sample kernels: a block per sample and group of capsules, one thread per component
  // (CapsuleColumns in routing_device.cuh).
  const int64_t capsules_per_block = smallest(num_out, kColumnKernelMaxThreads / dim_out);
  plan.squash = {
      LaunchDims{unsigned(batch), unsigned(ceil_div(num_out, capsules_per_block)), 1},
      LaunchDims{unsigned(capsules_per_block * dim_out), 1, 1}, size_t(2 * capsules_per_block * dim_out * acc_bytes)};
  plan.prior_coupling = {
      LaunchDims{unsigned(ceil_div(num_in, kColumnKernelMaxThreads)), 1, 1},
      LaunchDims{unsigned(kColumnKernelMaxThreads), 1, 1}, 0};

  // grad_weight_kernel: block (32 inputs, row groups, sample groups).
  const int64_t row_groups = ceil_div(dim_out, weight_rows);
  const int64_t groups_per_block = smallest(row_groups, kGradWeightMaxThreads / kWarpSize);
  const int64_t row_blocks = ceil_div(row_groups, groups_per_block);
  const int64_t input_tiles = ceil_div(num_in, kWarpSize);
  const int64_t base_warps = input_tiles * num_out * row_blocks * groups_per_block;
  const int64_t group_bytes = kWarpSize * groups_per_block * max_dim_in * acc_bytes;  // one round of one group
  const int64_t max_groups = smallest(
      smallest(kGradWeightMaxThreads / (kWarpSize * groups_per_block), limits.max_shared_bytes_per_block / group_bytes),
      batch);
  part.sample_groups =
      int(clamp(ceil_div(kGradWeightWarpsPerMultiprocessor * limits.multiprocessor_count, base_warps), 1, max_groups < 1 ? 1 : max_groups));
  plan.grad_weight = {
      LaunchDims{unsigned(input_tiles), unsigned(num_out), unsigned(row_blocks)},
      LaunchDims{unsigned(kWarpSize), unsigned(groups_per_block), unsigned(part.sample_groups)},
      size_t(part.sample_groups > 1 ? part.sample_groups * group_bytes : 0)};

  const int64_t columns = num_out * dim_out;
  plan.grad_bias = {
      LaunchDims{unsigned(ceil_div(columns, kWarpSize)), 1, 1},
      LaunchDims{unsigned(kWarpSize), unsigned(kGradBiasSampleGroups), 1},
      size_t(kWarpSize * kGradBiasSampleGroups * acc_bytes)};

  plan.partials_numel = batch * part.num_chunks * columns;
  plan.forward_agreement_numel = iterations > 1 ? batch * columns : 0;
  plan.backward_agreement_numel = batch * iterations * columns;
  plan.terms_numel = batch * part.terms * columns;
  plan.coefficients_numel = int64_t(part.coefficient_slots) * num_in * num_out * batch;
  return plan;
}

}  // namespace capsnet::cuda
