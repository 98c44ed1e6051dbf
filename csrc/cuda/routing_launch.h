// Launch planning for the CUDA routing kernels: tile class, work partition, grid, block and
// shared-memory sizes, workspace sizes.
//
// Plain host C++ (no CUDA, no ATen), shared by the real launcher (routing_kernel.cu) and the
// emulated one (csrc/simt/emulated_routing.cpp): both launch with the very same plan.
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
  RoutingSizes sizes;  // with the partition of the inputs filled in
  TileKind tile;
  int64_t grad_weight_inputs;  // inputs per block of grad_weight_kernel
  int grad_input_slice;        // input dimensions per shared-memory round of grad_input_kernel
  KernelLaunch forward_partial_sums;
  KernelLaunch backward_partial_sums;
  KernelLaunch squash;  // forward_squash_kernel and backward_squash_kernel
  KernelLaunch grad_weight;
  KernelLaunch grad_input;
  // Workspace sizes in elements.
  int64_t partials_numel;       // [B, num_chunks, J, D]
  int64_t per_iteration_numel;  // [B, r, J, D]: grad_s, and squashed
  int64_t logit_grad_numel;     // [r - 1, I, J, B]
};

// Planning policy. The numbers aim at keeping every SM busy with a few blocks while each
// block does enough work to amortise its fixed costs (see docs/CUDA.md, "Launch plan").
constexpr int64_t kWarpSize = 32;
constexpr int64_t kRoutingBlocksPerMultiprocessor = 2;
constexpr int64_t kMinInputsPerChunk = 16;
constexpr int64_t kGradWeightBlocksPerMultiprocessor = 2;
constexpr int64_t kGradInputSharedBudget = 32 * 1024;

namespace plan_detail {
inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
inline int64_t clamp(int64_t value, int64_t low, int64_t high) {
  return value < low ? low : (value > high ? high : value);
}
inline int64_t max_routing_threads(TileKind tile, const DeviceLimits& limits) {
  const int64_t tile_limit = tile == TileKind::kCapsNet ? CapsNetTile::kMaxThreads : GenericTile::kMaxThreads;
  return tile_limit < limits.max_threads_per_block ? tile_limit : limits.max_threads_per_block;
}
}  // namespace plan_detail

// Empty when the CUDA kernels handle the shape; otherwise the reason, for a TORCH_CHECK.
inline std::string unsupported_shape_reason(
    int64_t num_out, int64_t dim_out, int64_t dim_in, int64_t iterations, const DeviceLimits& limits) {
  const std::string fallback =
      "; use dynamic_routing(..., backend='reference') for this shape on the GPU";
  if (dim_out > GenericTile::kMaxDimOut) {
    return "capsnet CUDA kernels support D_out <= " + std::to_string(GenericTile::kMaxDimOut) +
        ", got D_out = " + std::to_string(dim_out) + " (W.size(2))" + fallback;
  }
  if (dim_in > GenericTile::kMaxDimIn) {
    return "capsnet CUDA kernels support D_in <= " + std::to_string(GenericTile::kMaxDimIn) +
        ", got D_in = " + std::to_string(dim_in) + " (u.size(2))" + fallback;
  }
  const int64_t max_out = plan_detail::max_routing_threads(TileKind::kGeneric, limits);
  if (num_out > max_out) {
    return "capsnet CUDA kernels support N_out <= " + std::to_string(max_out) +
        " (one thread per output capsule), got N_out = " + std::to_string(num_out) + " (W.size(1))" +
        fallback;
  }
  if (iterations > std::numeric_limits<int>::max()) {
    return "num_iterations = " + std::to_string(iterations) + " is too large";
  }
  return "";
}

// The plan for one call with batch >= 1 on a shape that unsupported_shape_reason accepts.
inline RoutingPlan plan_routing(
    int64_t batch, int64_t num_in, int64_t num_out, int64_t dim_out, int64_t dim_in, int64_t iterations,
    int64_t scalar_bytes, const DeviceLimits& limits) {
  using plan_detail::ceil_div;
  using plan_detail::clamp;
  RoutingPlan plan{};
  RoutingSizes& n = plan.sizes;
  n.batch = batch;
  n.num_in = num_in;
  n.num_out = int(num_out);
  n.dim_out = int(dim_out);
  n.dim_in = int(dim_in);
  n.iterations = int(iterations);

  // Tile class: the fast one whenever the shape fits it.
  const bool fits_capsnet_tile = dim_in == CapsNetTile::kMaxDimIn && dim_out <= CapsNetTile::kMaxDimOut &&
      num_out <= plan_detail::max_routing_threads(TileKind::kCapsNet, limits);
  plan.tile = fits_capsnet_tile ? TileKind::kCapsNet : TileKind::kGeneric;

  // Routing kernels: block (lanes, J) with up to a warp of samples, so that a warp's lanes
  // hold consecutive samples of one output capsule and read the same W row.
  const int64_t max_threads = plan_detail::max_routing_threads(plan.tile, limits);
  n.samples_per_block = int(clamp(max_threads / num_out, 1, kWarpSize < batch ? kWarpSize : batch));
  const int64_t sample_tiles = ceil_div(batch, n.samples_per_block);
  // Split the inputs into as many chunks as it takes to give every SM a few blocks, but
  // keep at least kMinInputsPerChunk inputs per block.
  const int64_t wanted_blocks = kRoutingBlocksPerMultiprocessor * limits.multiprocessor_count;
  const int64_t wanted_chunks = ceil_div(wanted_blocks, sample_tiles);
  const int64_t min_inputs = kMinInputsPerChunk < num_in ? kMinInputsPerChunk : num_in;
  n.inputs_per_chunk = clamp(ceil_div(num_in, wanted_chunks), min_inputs, num_in);
  n.num_chunks = ceil_div(num_in, n.inputs_per_chunk);

  // Couplings are staged a 32-byte sector's worth of inputs at a time, or fewer where that
  // does not fit next to the exchange buffers (only the widest generic blocks in float64).
  const int64_t exchange_bytes = exchange_elements(n.num_out, n.samples_per_block) * scalar_bytes;
  const int64_t thread_values_bytes = num_out * n.samples_per_block * scalar_bytes;  // one per thread
  n.coupling_run = int(clamp(
      (limits.max_shared_bytes_per_block - exchange_bytes) / thread_values_bytes - 1, 1,
      kSectorBytes / scalar_bytes));
  const int64_t staging_bytes = staging_elements(n.num_out, n.samples_per_block, n.coupling_run) * scalar_bytes;
  const LaunchDims routing_grid{unsigned(sample_tiles), unsigned(n.num_chunks), 1};
  const LaunchDims routing_block{unsigned(n.samples_per_block), unsigned(num_out), 1};
  plan.forward_partial_sums = {routing_grid, routing_block, size_t(exchange_bytes + staging_bytes)};
  plan.backward_partial_sums = {routing_grid, routing_block, size_t(exchange_bytes)};

  // Column kernels: one thread per (j, d), up to kColumnKernelMaxThreads.
  const int64_t columns = num_out * dim_out;
  const int64_t column_threads = clamp(
      ceil_div(columns, kWarpSize) * kWarpSize, kWarpSize,
      kColumnKernelMaxThreads < limits.max_threads_per_block ? kColumnKernelMaxThreads : limits.max_threads_per_block);
  const LaunchDims column_block{unsigned(column_threads), 1, 1};
  plan.squash = {LaunchDims{unsigned(batch), 1, 1}, column_block, 0};

  const int64_t max_grad_weight_inputs =
      plan.tile == TileKind::kCapsNet ? CapsNetTile::kGradWeightInputs : GenericTile::kGradWeightInputs;
  plan.grad_weight_inputs = clamp(
      ceil_div(num_in, kGradWeightBlocksPerMultiprocessor * limits.multiprocessor_count), 1,
      max_grad_weight_inputs);
  plan.grad_weight = {LaunchDims{unsigned(ceil_div(num_in, plan.grad_weight_inputs)), 1, 1}, column_block, 0};

  // grad_input_kernel sums over j in shared memory [slice][J][lanes].
  plan.grad_input_slice = int(clamp(kGradInputSharedBudget / thread_values_bytes, 1, dim_in));
  plan.grad_input = {routing_grid, routing_block, size_t(plan.grad_input_slice * thread_values_bytes)};

  plan.partials_numel = batch * n.num_chunks * columns;
  plan.per_iteration_numel = batch * iterations * columns;
  plan.logit_grad_numel = (iterations - 1) * num_in * num_out * batch;
  return plan;
}

}  // namespace capsnet::cuda
