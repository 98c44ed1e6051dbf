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
  // Whether global-to-shared copies can run in the background (cp.async, sm_80 and later):
  // only then does the forward's input ring overlap its loads with the math (plan_routing).
  bool async_copies;
  // With the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize, which the CUDA launcher
  // sets for a launch above 48 KiB), and per SM: the backward sweep's input ring needs more
  // than 48 KiB per block.
  int64_t max_shared_bytes_per_block_optin;
  int64_t shared_bytes_per_multiprocessor;
};

// The shared memory the CUDA runtime reserves per resident block (sm_80 and later).
constexpr int64_t kSharedBytesReservedPerBlock = 1024;

// An H100 SXM: what the emulator plans for unless a test asks for another count of SMs.
constexpr DeviceLimits kH100Limits{132, 1024, 48 * 1024, true, 227 * 1024, 228 * 1024};

// Choices that replace the planner's own, for experiments that map how a GPU's time depends
// on them (benchmarks/plan_sweep.py; set through CAPSNET_CUDA_PLAN, routing_host.h). A
// choice outside what the shape allows is brought to its nearest allowed value.
// - inputs_per_chunk (0: the planner's): to [ceil(N_in / kMaxChunks), N_in].
// - sample_groups (0: the planner's; the CapsNet tile's gradient kernel): a power of two up
//   to kGradientInputGroups, at most one group per 16-byte vector of samples.
// - staging_slots (-1: the planner's): 0 (direct loads) or kInputRingSlots (the forward
//   kernels read W and u through an InputRing, routing_staging.cuh). The ring exists for
//   the CapsNet tile with float32 storage and J >= kMinStagedNumOut, when it fits in the
//   shared memory of a block; the planner takes it there on GPUs with async_copies.
// - gradient_rows (0: kDefaultGradientRows): the rows of W[i, j] per thread of the CapsNet
//   tile's gradient kernel, kNarrowGradientRows or kWideGradientRows (float32 storage).
// - sweep_staging_slots (-1: the planner's): 0 (direct loads) or kInputRingSlots (the
//   backward sweep's kernels read W and u through an InputRing of their own). It exists
//   where the forward's does; the sweep's larger block (two kinds of thread rows: over 48 KiB
//   with the ring) must still fit kRoutingBlocksPerMultiprocessor blocks on an SM, within
//   the opt-in limit of a block. The planner takes it there on GPUs with async_copies.
// - gradient_loads_ahead (-1: the planner's, 1 where gradient_round_in_flight): 0 makes the
//   4-row float32 gradient kernel load each product term and each u row where it is used,
//   as it did before it loaded ahead (to time the two in one run).
// Storage other than float32 has neither the rings, nor the wide rows, nor the gradient
// kernel without its loads ahead compiled: routing_host.h (plan_choices_for) clears those
// choices for it before they reach the planner.
struct PlanChoices {
  int64_t inputs_per_chunk = 0;
  int64_t sample_groups = 0;
  int64_t staging_slots = -1;
  int64_t gradient_rows = 0;
  int64_t sweep_staging_slots = -1;
  int64_t gradient_loads_ahead = -1;
};

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
  KernelLaunch forward_iteration;  // forward_iteration_kernel
  int staging_slots;               // of its InputRing (0: direct loads)
  KernelLaunch backward_sweep;     // backward_sweep_kernel
  int sweep_staging_slots;         // of its InputRing (0: direct loads)
  KernelLaunch backward_output;    // backward_output_kernel (r = 1: no sweep)
  KernelLaunch gradients;          // gradient_kernel (CapsNet tile)
  int gradient_rows;               // its rows of W[i, j] per thread (CapsNet tile)
  bool gradient_loads_ahead;       // its terms two at a time and u rows staged a round ahead
  KernelLaunch grad_weight;        // grad_weight_kernel (generic tile)
  KernelLaunch grad_input;         // grad_input_kernel (generic tile)
  // Workspace sizes in elements of the op-math type (counters: int32).
  int64_t partials_numel;      // [B, num_chunks, J, D]
  int64_t agreement_numel;     // [r - 1, B, J, D]
  int64_t terms_numel;         // [B, terms, J, D]
  int64_t coefficients_numel;  // [slots, I, J, B']
  int64_t counters_numel;      // [sample tiles, num_chunks]
};

// Planning policy. The numbers aim at keeping every SM busy with a few blocks while each
// block does enough work to amortise its fixed costs (docs/CUDA.md, "Launch plan").
constexpr int64_t kRoutingBlocksPerMultiprocessor = 2;
// The routing chunks' cost model (plan_detail::routing_chunk_cost), fitted to the H200's
// times of the routing kernels under 5 to 6 chunk sizes at B in {32, 128, 512, 1024}, in
// two runs (benchmarks/results/gpu-check-nvidia-h200-2026-11-27*/plan-sweep.json; 9% rms
// error): a block's fixed work (loading its state, writing its partial sums) is that of 6
// input capsules; two blocks on one SM do 1.35 times the work of one in the same time; a
// level of the chunk tree costs 1.5 inputs.
constexpr int64_t kRoutingBlockOverheadInputs = 6;
constexpr int64_t kCoResidentSpeedupPercent = 135;
constexpr int64_t kChunkTreeLevelHalfInputs = 3;
constexpr int64_t kMinInputsPerChunk = 4;
constexpr int64_t kMaxChunks = 65535;  // the grid's y dimension
constexpr int64_t kGradWeightWarpsPerMultiprocessor = 24;
constexpr int64_t kGradInputSharedBudget = 32 * 1024;
// The CapsNet tile's gradient kernel: a group's fixed work (loading W, its level of the
// groups' sum) counted as this many samples when the planner picks the sample groups.
constexpr int64_t kGradientGroupOverheadSamples = 1;
// The backward's coefficient workspace is at most this large: larger batches are processed
// in slices of samples (routing_host.h), each slice adding its share to dW, dbias, dprior.
constexpr int64_t kMaxCoefficientBytes = int64_t(256) << 20;

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
inline int bit_length(int64_t x) {
  int bits = 0;
  for (; x > 0; x >>= 1) {
    ++bits;
  }
  return bits;
}

// The busiest SM's time for a routing launch of sample_tiles x chunks blocks of `inputs`
// input capsules each, two resident per SM, in units of one input's time on a lone block:
//   pairs x 2 x (inputs + overhead) / 1.35 + lone x (inputs + overhead) + 1.5 x tree levels
// (pairs: of blocks on that SM; lone: the odd one), returned times 2 x 135: an exact
// integer, so that ties go to the smaller chunks on every host.
inline int64_t routing_chunk_cost(int64_t sample_tiles, int64_t chunks, int64_t inputs, int64_t sms) {
  static_assert(kRoutingBlocksPerMultiprocessor == 2, "the cost pairs the blocks on an SM");
  const int64_t blocks = ceil_div(sample_tiles * chunks, sms);
  const int64_t pairs = blocks / 2, lone = blocks % 2;
  const int64_t block_work = 2 * (inputs + kRoutingBlockOverheadInputs);  // in half inputs
  return pairs * 2 * block_work * 100 + lone * block_work * kCoResidentSpeedupPercent +
         kChunkTreeLevelHalfInputs * bit_length(chunks - 1) * kCoResidentSpeedupPercent;
}
inline bool fits_capsnet_tile(const RoutingShape& shape, const DeviceLimits& limits) {
  return shape.dim_in == CapsNetTile::kMaxDimIn && shape.dim_out == CapsNetTile::kMaxDimOut &&
      shape.num_out <= CapsNetTile::kMaxNumOut &&
      shape.num_out * CapsNetTile::kLanes <= max_routing_threads(TileKind::kCapsNet, limits);
}
// Coefficients per sample of the backward (all slots), and a batch rounded up to whole
// 16-byte vectors of them.
inline int64_t coefficients_per_sample(const RoutingShape& shape, bool has_prior, bool detach_routing) {
  return int64_t(BackwardTerms{shape.iterations, detach_routing, has_prior}.slots()) * shape.num_in * shape.num_out;
}
inline int64_t padded_batch(int64_t batch, int64_t acc_bytes) {
  const int64_t per_vector = 16 / acc_bytes;
  return ceil_div(batch, per_vector) * per_vector;
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
  // The kernels index with 32-bit offsets. The backward's coefficient workspace is bounded
  // by slicing the batch (kMaxCoefficientBytes, far below 2^31 elements; a slice holds at
  // least 32 samples, padded to 64 at most); the other tensors and workspaces grow with B
  // times at most (2 r - 1 + chunks) J D.
  const int64_t limit = int64_t(1) << 31;
  const int64_t per_sample_coefficients = (2 * shape.iterations - 1) * shape.num_in * shape.num_out;
  const int64_t per_sample_vectors = (2 * shape.iterations - 1 + shape.num_in) * shape.num_out * shape.dim_out;
  if (64 * per_sample_coefficients >= limit || shape.batch * per_sample_vectors >= limit ||
      shape.batch * shape.num_in * shape.dim_in >= limit ||
      shape.num_in * shape.num_out * shape.dim_out * shape.dim_in >= limit) {
    return "capsnet CUDA kernels index with 32-bit offsets: B * (2 r - 1 + N_in) * N_out * D_out, B * N_in * D_in, "
           "64 * (2 r - 1) * N_in * N_out and the number of elements of W must stay below 2^31 (split the batch)" +
        fallback;
  }
  return "";
}

// Samples per pass of the backward: the whole batch unless its coefficient workspace would
// exceed max_bytes (kMaxCoefficientBytes; then routing_host.h runs the backward slice by
// slice), in which case a multiple of a 16-byte vector of coefficients.
inline int64_t backward_slice_batch(
    const RoutingShape& shape, bool has_prior, bool detach_routing, int64_t acc_bytes,
    int64_t max_bytes = kMaxCoefficientBytes) {
  const int64_t per_sample = plan_detail::coefficients_per_sample(shape, has_prior, detach_routing) * acc_bytes;
  constexpr int64_t kPadding = 32;  // the coefficient workspace's batch is padded to whole sample tiles (<= 32)
  if (per_sample == 0 || (shape.batch + kPadding) * per_sample <= max_bytes) {
    return shape.batch;
  }
  return plan_detail::largest_of(kPadding, (max_bytes / per_sample - kPadding) / kPadding * kPadding);
}

// The plan for one call (or one backward slice) with batch >= 1 on a shape that
// unsupported_shape_reason accepts. acc_bytes: the size of the op-math type (workspaces
// and shared memory are in it). Storage other than float32 needs its choices through
// plan_choices_for (routing_host.h): the planner alone would give float16 the ring.
inline RoutingPlan plan_routing(
    const RoutingShape& shape, bool has_prior, bool detach_routing, int64_t acc_bytes, const DeviceLimits& limits,
    const PlanChoices& choices = {}) {
  using plan_detail::ceil_div;
  using plan_detail::clamp;
  using plan_detail::smallest;
  RoutingPlan plan{};
  plan.geometry.shape = shape;
  RoutingPartition& part = plan.geometry.part;
  const int64_t batch = shape.batch, num_in = shape.num_in, num_out = shape.num_out;
  const int64_t dim_out = shape.dim_out, dim_in = shape.dim_in, iterations = shape.iterations;
  const int64_t sms = limits.multiprocessor_count;

  // Tile class: the fast one whenever the shape fits it.
  const bool capsnet = plan_detail::fits_capsnet_tile(shape, limits);
  plan.tile = capsnet ? TileKind::kCapsNet : TileKind::kGeneric;
  const int64_t samples_per_thread = capsnet ? cuda::samples_per_thread<CapsNetTile>(int(acc_bytes))
                                             : cuda::samples_per_thread<GenericTile>(int(acc_bytes));

  // Routing kernels: block (lanes, J), consecutive samples of one output capsule side by
  // side in a warp, so that they read the same W row. The CapsNet tile's lane count is a
  // compile-time constant (samples past the batch idle); otherwise up to a warp.
  const int64_t max_threads = plan_detail::max_routing_threads(plan.tile, limits);
  part.lanes = capsnet ? CapsNetTile::kLanes : int(clamp(max_threads / num_out, 1, smallest(kWarpSize, batch)));
  part.samples_per_block = int(part.lanes * samples_per_thread);
  part.sample_tiles = ceil_div(batch, part.samples_per_block);
  // Input chunks: the size that minimises the busiest SM's time (routing_chunk_cost), with
  // at least kMinInputsPerChunk inputs per chunk. On 132 SMs: 9 inputs at B <= 32 (one block
  // per SM), 18 at B = 128, 72 at B = 512.
  int64_t best_cost = -1;
  for (int64_t inputs = smallest(kMinInputsPerChunk, num_in); inputs <= num_in; ++inputs) {
    const int64_t chunks = ceil_div(num_in, inputs);
    if (inputs > smallest(kMinInputsPerChunk, num_in) && ceil_div(num_in, inputs - 1) == chunks) {
      continue;  // the same chunks with fewer inputs in the last one
    }
    const int64_t cost = plan_detail::routing_chunk_cost(part.sample_tiles, chunks, inputs, sms);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      part.inputs_per_chunk = inputs;
    }
  }
  if (choices.inputs_per_chunk > 0) {
    part.inputs_per_chunk = clamp(choices.inputs_per_chunk, ceil_div(num_in, kMaxChunks), num_in);
  }
  part.num_chunks = ceil_div(num_in, part.inputs_per_chunk);
  part.chunk_levels = plan_detail::bit_length(part.num_chunks - 1);

  const BackwardTerms terms{iterations, detach_routing, has_prior};
  part.terms = terms.count();
  part.coefficient_slots = terms.slots();
  part.coefficient_batch = plan_detail::padded_batch(ceil_div(batch, part.samples_per_block) * part.samples_per_block, acc_bytes);

  const LaunchDims routing_grid{unsigned(part.sample_tiles), unsigned(part.num_chunks), 1};
  const LaunchDims routing_block{unsigned(part.lanes), unsigned(num_out), 1};
  const int64_t exchange = capsnet ? exchange_elements<CapsNetTile>(num_out, part.lanes, int(acc_bytes))
                                   : exchange_elements<GenericTile>(num_out, part.lanes, int(acc_bytes));
  const size_t exchange_bytes = size_t(exchange * acc_bytes);
  // Thread rows (ThreadRows): V_k in the forward, V_m and gs_m in the sweep.
  const int64_t routing_threads = num_out * part.lanes;
  const auto thread_rows = [&](int kinds) {
    return size_t(acc_bytes) * size_t(capsnet ? thread_row_elements<CapsNetTile>(routing_threads, kinds, int(acc_bytes))
                                              : thread_row_elements<GenericTile>(routing_threads, kinds, int(acc_bytes)));
  };
  plan.forward_iteration = {routing_grid, routing_block, exchange_bytes + thread_rows(1)};
  plan.backward_sweep = {routing_grid, routing_block, exchange_bytes + thread_rows(2)};
  // The input ring (InputRing) exists for the CapsNet tile with float32 storage and J >=
  // kMinStagedNumOut; it takes ring_bytes more shared memory in the kernel that has it.
  const bool ring_exists = capsnet && acc_bytes == 4 && num_out >= kMinStagedNumOut;
  const size_t ring_bytes = size_t(kInputRingSlots) * size_t(input_slot_floats(num_out)) * sizeof(float);
  // The forward's: if chosen, or by default on GPUs that copy in the background (on an
  // H200 the forward took 0.81x the direct loads' time at B = 128, 0.66x at B = 1024;
  // without cp.async the ring's copies would only add instructions), within 48 KiB.
  const bool ring_wanted = choices.staging_slots < 0 ? limits.async_copies : choices.staging_slots == kInputRingSlots;
  if (ring_wanted && ring_exists &&
      plan.forward_iteration.shared_bytes + ring_bytes <= size_t(limits.max_shared_bytes_per_block)) {
    plan.forward_iteration.shared_bytes += ring_bytes;
    plan.staging_slots = kInputRingSlots;
  }
  // The sweep's, by the same default (on an H200 the two sweep passes took 0.85x the direct
  // loads' time at B = 128, 0.73x at B = 1024): past 48 KiB (the opt-in), as long as the SM
  // still holds the blocks the chunk sizes were planned for.
  const bool sweep_ring_wanted =
      choices.sweep_staging_slots < 0 ? limits.async_copies : choices.sweep_staging_slots == kInputRingSlots;
  const size_t sweep_bytes = plan.backward_sweep.shared_bytes + ring_bytes;
  if (sweep_ring_wanted && ring_exists &&
      sweep_bytes <= size_t(limits.max_shared_bytes_per_block_optin) &&
      kRoutingBlocksPerMultiprocessor * (int64_t(sweep_bytes) + kSharedBytesReservedPerBlock) <=
          limits.shared_bytes_per_multiprocessor) {
    plan.backward_sweep.shared_bytes = sweep_bytes;
    plan.sweep_staging_slots = kInputRingSlots;
  }

  // backward_output_kernel (r = 1): the sweep's blocks without the input chunks.
  plan.backward_output = {LaunchDims{unsigned(part.sample_tiles), 1, 1}, routing_block, 0};
  plan.prior_coupling = {
      LaunchDims{unsigned(ceil_div(num_in, kColumnKernelMaxThreads)), 1, 1},
      LaunchDims{unsigned(kColumnKernelMaxThreads), 1, 1}, 0};

  const int64_t vector_values = 16 / acc_bytes;  // coefficients per 16-byte load
  if (capsnet) {
    // gradient_kernel: block (row groups x inputs, J, sample groups), inputs x groups =
    // kGradientInputGroups; the split that minimises the busiest SM's work (blocks per SM
    // times samples per group plus a group's fixed work per level of the groups' sum).
    const bool wide_rows = acc_bytes == 4 && choices.gradient_rows == kWideGradientRows;
    plan.gradient_rows = wide_rows ? kWideGradientRows : kDefaultGradientRows;
    const int64_t row_groups = gradient_row_groups(plan.gradient_rows);
    plan.gradient_loads_ahead =
        gradient_round_in_flight(plan.gradient_rows, int(acc_bytes)) && choices.gradient_loads_ahead != 0;
    int64_t best = -1;
    int groups = 1;
    for (int z = 1; z <= kGradientInputGroups; z *= 2) {
      if (z > 1 && ceil_div(batch, vector_values) < z) {
        break;  // a group per vector of samples at least
      }
      const int64_t blocks = ceil_div(num_in, kGradientInputGroups / z);
      const int64_t per_group = ceil_div(batch, z) + kGradientGroupOverheadSamples * (1 + plan_detail::bit_length(z - 1));
      const int64_t cost = ceil_div(blocks, sms) * per_group;
      if (best < 0 || cost < best) {
        best = cost;
        groups = z;
      }
    }
    if (choices.sample_groups > 0) {
      groups = 1;
      while (groups * 2 <= smallest(choices.sample_groups, int64_t(kGradientInputGroups)) &&
             ceil_div(batch, vector_values) >= groups * 2) {
        groups *= 2;
      }
    }
    part.sample_groups = groups;
    part.gradient_inputs_per_block = int(kGradientInputGroups / groups);
    part.gradient_input_shift = plan_detail::bit_length(part.gradient_inputs_per_block - 1);
    part.gradient_group_samples = ceil_div(ceil_div(batch, groups), vector_values) * vector_values;
    part.gradient_rounds = int(part.gradient_group_samples / vector_values);
    part.gradient_group_levels = plan_detail::bit_length(groups - 1);
    const int64_t threads_x = row_groups * part.gradient_inputs_per_block;
    const int64_t threads = threads_x * num_out * groups;
    // Shared memory: a round of dL/du partial vectors, [vector of samples][group x input][E]
    // [kMaxNumOut x row groups], each of its rows' destination, and where the kernel loads
    // ahead two rounds of u rows (storage elements, no larger than op-math ones); reused
    // for the sum of the groups' dW (the shares of at most half the threads at a level of
    // the tree) and for the bias gradient's per-thread sums.
    const int64_t contributors = ceil_div(CapsNetTile::kMaxNumOut * row_groups, vector_values) * vector_values;
    const int64_t round_rows = vector_values * kGradientInputGroups * dim_in;
    const int64_t round = round_rows * contributors +
        round_rows * int64_t(sizeof(GradientRowDestination)) / acc_bytes +
        (plan.gradient_loads_ahead ? 2 * round_rows : 0);
    const int64_t group_sum = threads / 2 * gradient_group_share(int(acc_bytes), plan.gradient_rows);
    const int64_t shared = plan_detail::largest_of(round, plan_detail::largest_of(group_sum, threads + 16));
    plan.gradients = {
        LaunchDims{unsigned(ceil_div(num_in, part.gradient_inputs_per_block)), 1, 1},
        LaunchDims{unsigned(threads_x), unsigned(num_out), unsigned(groups)}, size_t(shared * acc_bytes)};
  } else {
    // grad_weight_kernel: block (32 inputs, row groups, sample groups).
    const int64_t weight_rows = GenericTile::kGradRows;
    const int64_t row_groups = ceil_div(dim_out, weight_rows);
    const int64_t groups_per_block = smallest(row_groups, kGradWeightMaxThreads / kWarpSize);
    const int64_t row_blocks = ceil_div(row_groups, groups_per_block);
    const int64_t input_tiles = ceil_div(num_in, kWarpSize);
    const int64_t base_warps = input_tiles * num_out * row_blocks * groups_per_block;
    const int64_t group_bytes = kWarpSize * groups_per_block * GenericTile::kMaxDimIn * acc_bytes;  // a round of a group
    const int64_t max_groups = smallest(
        smallest(kGradWeightMaxThreads / (kWarpSize * groups_per_block), limits.max_shared_bytes_per_block / group_bytes),
        batch);
    part.sample_groups = int(
        clamp(ceil_div(kGradWeightWarpsPerMultiprocessor * sms, base_warps), 1, max_groups < 1 ? 1 : max_groups));
    part.gradient_inputs_per_block = kWarpSize;
    const int64_t threads = kWarpSize * groups_per_block * part.sample_groups;
    plan.grad_weight = {
        LaunchDims{unsigned(input_tiles), unsigned(num_out), unsigned(row_blocks)},
        LaunchDims{unsigned(kWarpSize), unsigned(groups_per_block), unsigned(part.sample_groups)},
        size_t(plan_detail::largest_of(part.sample_groups > 1 ? part.sample_groups * group_bytes : 0, (threads + 16) * acc_bytes))};
    // grad_input_kernel sums over j in shared memory [slice][J][lanes].
    const int64_t thread_values_bytes = num_out * part.lanes * acc_bytes;  // one value per thread
    part.grad_input_slice = int(clamp(kGradInputSharedBudget / thread_values_bytes, 1, dim_in));
    plan.grad_input = {routing_grid, routing_block, size_t(part.grad_input_slice * thread_values_bytes)};
  }

  const int64_t columns = num_out * dim_out;
  plan.partials_numel = batch * part.num_chunks * columns;
  plan.agreement_numel = (iterations - 1) * batch * columns;
  plan.terms_numel = batch * part.terms * columns;
  plan.coefficients_numel = int64_t(part.coefficient_slots) * num_in * num_out * part.coefficient_batch;
  plan.counters_numel = part.sample_tiles * part.num_chunks;
  return plan;
}

}  // namespace capsnet::cuda
