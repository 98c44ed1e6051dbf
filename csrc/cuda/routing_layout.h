// Tile classes, the partition of the work, and where every element of the CUDA kernels'
// tensors and workspaces lives.
//
// Shared by the kernels (routing_forward.cuh, routing_backward.cuh, routing_gradients.cuh;
// compiled by nvcc and by the CPU emulator in csrc/simt), the launch planner
// (routing_launch.h) and the host code (routing_host.h), so that every party agrees on the
// layouts and compile-time bounds.
//
// Notation (docs/CUDA.md): B samples, I = N_in input capsules, J = N_out output capsules,
// D = D_out, E = D_in, r routing iterations counted from 0 (k = 0..r-1). The sizes are the
// backend-neutral capsnet::RoutingShape (csrc/routing_math.h); the partition is ours.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "routing_math.h"

namespace capsnet::cuda {

// ---------------------------------------------------------------------------------------
// Tile classes: compile-time bounds of the per-thread vectors.
//
// A thread keeps D_out- and D_in-vectors in registers, which needs their bounds at compile
// time; a tile class fixes them, the planner picks the class for a shape, and the kernels
// are instantiated once per class.
// ---------------------------------------------------------------------------------------

// The CapsNet shape: D_in == 8 and D_out == 16, both exact, so that no loop needs a bound
// check, and N_out <= 10 (the ten classes of MNIST, CIFAR-10, ...). Rows of u and W (8
// elements) are read as whole 16-byte vectors. A routing thread holds one output capsule j
// of two samples (samples_per_thread, float math): every row of W it loads serves both,
// which halves the loads per multiply-add. A routing block holds 16 lanes (compile-time:
// the capsule exchange's addresses are then constants) of every output capsule, at most
// 160 threads, and two such blocks fit on an SM (up to 168 registers per thread: an SM
// quarter holds three of their warps), so that one block's barriers overlap the other's
// work. A gradient thread owns some rows of W[i, j] and of dW[i, j] (kDefaultGradientRows).
struct CapsNetTile {
  static constexpr int kMaxDimOut = 16;
  static constexpr int kMaxDimIn = 8;
  static constexpr bool kExactDimIn = true;   // D_in must equal kMaxDimIn
  static constexpr bool kExactDimOut = true;  // D_out must equal kMaxDimOut
  static constexpr int kLanes = 16;           // threads per output capsule in a routing block
  static constexpr int kMaxNumOut = 10;       // N_out
  static constexpr int kMaxThreads = kLanes * kMaxNumOut;  // __launch_bounds__ of the routing kernels
  static constexpr int kMinBlocks = 2;        // ... and the blocks per SM the compiler must fit
};

// Every other supported shape (D_in, D_out <= 32, N_out <= 1024). Correct, not tuned.
struct GenericTile {
  static constexpr int kMaxDimOut = 32;
  static constexpr int kMaxDimIn = 32;
  static constexpr bool kExactDimIn = false;
  static constexpr bool kExactDimOut = false;
  static constexpr int kLanes = 0;  // threads per output capsule: chosen at run time
  static constexpr int kMaxNumOut = 0;  // N_out: at run time
  static constexpr int kMaxThreads = 1024;
  static constexpr int kMinBlocks = 1;
  static constexpr int kGradRows = 1;  // rows per grad_weight thread
};

// Samples per routing thread: two in the CapsNet tile with float math (its vectors then
// fill the registers), else one.
template <typename Tile>
C10_HOST_DEVICE constexpr int samples_per_thread(int acc_bytes) {
  return Tile::kLanes > 0 && acc_bytes == 4 ? 2 : 1;
}

// Threads per block (__launch_bounds__) of the per-sample kernel (backward_output_kernel),
// of grad_weight_kernel (generic tile), of the CapsNet tile's gradient kernel, and of
// prior_coupling_kernel.
constexpr int kColumnKernelMaxThreads = 256;
constexpr int kGradWeightMaxThreads = 256;
// The CapsNet tile's gradient kernel: (inputs x sample groups) per block.
constexpr int kGradientInputGroups = 8;
// Rows d of W[i, j] (and of dW[i, j]) that a thread of the CapsNet tile's gradient kernel
// holds in registers: kNarrowGradientRows (4) by default. With float math the registers
// that 4 rows leave free let a thread form the dL/du_hat rows of a round's samples
// together, their loads in flight at once instead of one sample's after another's (on an
// H200 this took the kernel from 186.8 to 145.9 us at B = 128 and from 1,760 to 1,225 us at
// B = 1024 against 8 rows; docs/CUDA.md). In double, 8 rows would need 256 registers and
// spill. kWideGradientRows (CAPSNET_CUDA_PLAN=gradient_rows=8, float32 storage only) keeps
// the 8-row kernel, which issues 13% fewer instructions, for GPUs where that pays. Fewer
// rows per thread mean more row groups: more threads per block, one block per SM.
constexpr int kNarrowGradientRows = 4;
constexpr int kWideGradientRows = 8;
constexpr int kDefaultGradientRows = kNarrowGradientRows;
C10_HOST_DEVICE constexpr int gradient_row_groups(int rows) {
  return CapsNetTile::kMaxDimOut / rows;
}
// Its __launch_bounds__: (row groups x inputs) x J x sample groups threads, and the blocks
// per SM the compiler must fit.
C10_HOST_DEVICE constexpr int gradient_max_threads(int rows) {
  return gradient_row_groups(rows) * kGradientInputGroups * CapsNetTile::kMaxNumOut;
}
C10_HOST_DEVICE constexpr int gradient_min_blocks(int rows) {
  return rows == kWideGradientRows ? 2 : 1;
}
// Whether the gradient kernel of `rows` rows and op-math of acc_bytes forms a round's
// samples' dL/du_hat rows together (their loads in flight at once), and can load ahead:
// their product terms two at a time and the next round's u rows staged in shared memory
// (routing_gradients.cuh). Only the 4-row kernel with float math has the registers: at the
// 168-register cap of their one or two blocks per SM, the float64 and 8-row kernels spill.
C10_HOST_DEVICE constexpr bool gradient_round_in_flight(int rows, int acc_bytes) {
  return rows == kNarrowGradientRows && acc_bytes == 4;
}
// Where the gradient kernel stores a row of a round's dL/du sums (one per row, in shared
// memory after the round's rows): in the round whose first sample, counted in the sample
// group, is s < limit, at grad_u[offset + s * I * E].
struct alignas(8) GradientRowDestination {
  int offset;
  int limit;
};
constexpr int kWarpSize = 32;

// The CapsNet tile's gradient kernel adds its sample groups' dW in a pairwise tree through
// shared memory, a thread's whole share at once: its `rows` rows of dW, then grad_prior in
// a 16-byte vector of its own, padded to an odd number of 16-byte vectors so that 8
// threads' vector accesses hit distinct banks. Elements per thread.
C10_HOST_DEVICE constexpr int gradient_group_share(int acc_bytes, int rows) {
  const int width = 16 / acc_bytes;
  const int vectors = rows * CapsNetTile::kMaxDimIn / width + 1;
  return (vectors | 1) * width;
}

// Shared memory of the capsule exchange (CapsuleExchange, routing_device.cuh): one buffer per
// kind of reduction; with compile-time lanes, a row of kMaxNumOut entries per (sample slot,
// lane), padded so that rows start an odd multiple of 16 bytes apart modulo the 128 bytes
// of the banks (the 16-byte loads of 8 lanes then hit different banks), else [J][lanes].
constexpr int kExchangeKinds = 3;

template <typename Tile>
C10_HOST_DEVICE constexpr int exchange_row_stride(int acc_bytes) {
  // kMaxNumOut rounded up to whole 16-byte vectors, plus the padding: 12 floats + 8: 80 B;
  // 10 doubles + 4: 112 B.
  return acc_bytes == 4 ? (Tile::kMaxNumOut + 3) / 4 * 4 + 8 : (Tile::kMaxNumOut + 1) / 2 * 2 + 4;
}

template <typename Tile>
C10_HOST_DEVICE inline int64_t exchange_elements(int64_t num_out, int64_t lanes, int acc_bytes) {
  return Tile::kLanes > 0
      ? int64_t(kExchangeKinds) * samples_per_thread<Tile>(acc_bytes) * Tile::kLanes * exchange_row_stride<Tile>(acc_bytes)
      : int64_t(kExchangeKinds) * num_out * lanes;
}

// The CapsNet tile's routing kernels keep per-thread D_out-vectors that they use once per
// input capsule in shared memory (ThreadRows, routing_device.cuh), after the exchange:
// `kinds` vectors per (thread, sample), stored 16-byte vector by 16-byte vector with the
// threads side by side, so that a warp's 16-byte loads are one contiguous line.
template <typename Tile>
C10_HOST_DEVICE inline int64_t thread_row_elements(int64_t threads, int kinds, int acc_bytes) {
  return Tile::kLanes > 0 ? int64_t(kinds) * threads * samples_per_thread<Tile>(acc_bytes) * Tile::kMaxDimOut : 0;
}

// The CapsNet tile's forward kernels can read W and u from a ring of kInputRingSlots slots
// in shared memory, after the thread rows, filled by asynchronous copies inputs ahead of
// their use (InputRing, routing_staging.cuh; float32 storage; chosen through
// CAPSNET_CUDA_PLAN). A slot holds input capsule i's W slab (the J matrices W[i, j], D x E
// each, contiguous in W) and the block's u rows of input i, each row padded by one 16-byte
// vector so that the 16-byte loads of 8 consecutive lanes hit different banks. Floats per
// slot.
constexpr int kInputRingSlots = 3;
constexpr int kInputRowStride = CapsNetTile::kMaxDimIn + 4;
// The u rows of a slot are copied by one thread each per 16-byte piece: J >= 4 (64 threads).
constexpr int kMinStagedNumOut = 4;

C10_HOST_DEVICE inline int64_t input_slot_floats(int64_t num_out) {
  return num_out * CapsNetTile::kMaxDimOut * CapsNetTile::kMaxDimIn +
         int64_t(CapsNetTile::kLanes) * samples_per_thread<CapsNetTile>(4) * kInputRowStride;
}

// ---------------------------------------------------------------------------------------
// The partition of one call's work, chosen by the planner (routing_launch.h).
// ---------------------------------------------------------------------------------------
struct RoutingPartition {
  // Routing kernels: grid (sample tiles, input chunks), block (lanes, J); each thread holds
  // samples_per_thread samples, so a block holds samples_per_block = lanes * that.
  int lanes;
  int samples_per_block;
  int64_t sample_tiles;
  int64_t inputs_per_chunk;
  int64_t num_chunks;
  // The chunks' partial sums of a sample tile are added pairwise in a binary tree of this
  // many levels, ceil(log2(num_chunks)) (ChunkTree, routing_tree.cuh).
  int chunk_levels;
  // CapsNet tile's gradient kernel: block (row groups x inputs_per_block, J,
  // sample_groups); group z walks samples [z * group_samples, + group_samples) in `rounds`
  // rounds of a 16-byte vector of samples; the groups' dW meet in a pairwise tree of
  // group_levels levels. Generic tile's grad_weight kernel: block (32 inputs, row groups,
  // sample_groups), group z walks samples z, z + sample_groups, ...
  int gradient_inputs_per_block;
  int gradient_input_shift;  // log2(gradient_inputs_per_block)
  int sample_groups;
  int64_t gradient_group_samples;
  int gradient_rounds;
  int gradient_group_levels;
  // Generic tile's grad_input kernel: input dimensions summed over j per shared-memory round.
  int grad_input_slice;
  // Backward workspaces: product terms of dL/du_hat, coefficient slots (BackwardTerms), and
  // the batch rounded up to whole sample tiles and 16-byte vectors of coefficients
  // (coefficient()).
  int terms;
  int coefficient_slots;
  int64_t coefficient_batch;
};

// The backward's product terms. dL/du_hat[b, i, j, :] is a short sum of per-sample vectors
// ([B, terms, J, D]) times per-(b, i, j) coefficients ([slots, I, J, B]):
//   full:   sum_{k=0}^{r-1} c_k gs_k + sum_{m=1}^{r-1} G_m v_{m-1}
//           term t = k < r: (c_k, gs_k); term t = r - 1 + m: (G_m, v_{m-1})
//           coefficient of term t >= 1 in slot t - 1 (c_m in slot m - 1, G_m in slot r - 2 + m);
//           G_0 (for grad_prior only) in slot 2r - 2
//   detach_routing: c_{r-1} gs_{r-1}, one term; c_{r-1} in slot 0 (r > 1)
// Term 0's coefficient with r = 1, or c_0 in the full form, is the initial coupling (uniform
// or the prior's), which is never stored.
struct BackwardTerms {
  int64_t iterations;  // r
  bool detach_routing;
  bool has_prior;

  C10_HOST_DEVICE int count() const { return detach_routing ? 1 : int(2 * iterations - 1); }
  C10_HOST_DEVICE int slots() const {
    if (detach_routing) {
      return iterations > 1 ? 1 : 0;
    }
    return int(2 * (iterations - 1)) + (has_prior ? 1 : 0);
  }
  // Terms whose vector is a gs_k (their sum over samples is grad_bias): terms 0 .. count - 1.
  C10_HOST_DEVICE int grad_s_count() const { return detach_routing ? 1 : int(iterations); }
  C10_HOST_DEVICE int grad_s_term(int64_t k) const { return detach_routing ? 0 : int(k); }
  C10_HOST_DEVICE int squashed_term(int64_t k) const { return int(iterations + k); }  // v_k, full only
  C10_HOST_DEVICE bool stored_coefficient(int t) const { return t > 0 || (detach_routing && iterations > 1); }
  C10_HOST_DEVICE int slot_of_term(int t) const { return detach_routing ? 0 : t - 1; }
  C10_HOST_DEVICE int coupling_slot(int64_t m) const { return detach_routing ? 0 : int(m - 1); }
  C10_HOST_DEVICE int logit_grad_slot(int64_t m) const {
    return m == 0 ? int(2 * iterations - 2) : int(iterations - 2 + m);
  }
};

// Everything a kernel needs to find an element: the op's sizes and the partition.
struct RoutingGeometry {
  RoutingShape shape;
  RoutingPartition part;

  C10_HOST_DEVICE int64_t columns() const { return shape.num_out * shape.dim_out; }  // J * D

  // u [B, I, E]: the row u[b, i, :].
  C10_HOST_DEVICE int64_t input_row(int64_t b, int64_t i) const { return (b * shape.num_in + i) * shape.dim_in; }
  // W [I, J, D, E]: the matrix W[i, j] (D rows of E).
  C10_HOST_DEVICE int64_t weight_matrix(int64_t i, int64_t j) const {
    return (i * shape.num_out + j) * shape.dim_out * shape.dim_in;
  }
  // logit_prior, and the couplings of the prior, [I, J]: element (i, j).
  C10_HOST_DEVICE int64_t pair(int64_t i, int64_t j) const { return i * shape.num_out + j; }
  // v, grad_v [B, J, D]: v[b, j, :].
  C10_HOST_DEVICE int64_t output_vector(int64_t b, int64_t j) const { return (b * shape.num_out + j) * shape.dim_out; }
  // s_saved [B, r, J, D]: [b, k, j, :].
  C10_HOST_DEVICE int64_t iteration_vector(int64_t b, int64_t k, int64_t j) const {
    return ((b * shape.iterations + k) * shape.num_out + j) * shape.dim_out;
  }
  // The running agreement vectors V_k = v_0 + ... + v_{k-1}, k = 1..r-1 [r-1, B, J, D]:
  // [k - 1, b, j, :] (the forward writes V_{k+1} while blocks of the same launch read V_k).
  C10_HOST_DEVICE int64_t agreement_vector(int64_t k, int64_t b, int64_t j) const {
    return ((k - 1) * shape.batch + b) * columns() + j * shape.dim_out;
  }
  // Partial sums over one input chunk [B, num_chunks, J, D]: [b, chunk, j, :]. The chunk
  // tree (ChunkTree) keeps the sum of a subtree in the slot of its first chunk.
  C10_HOST_DEVICE int64_t partial_vector(int64_t b, int64_t chunk, int64_t j) const {
    return ((b * part.num_chunks + chunk) * shape.num_out + j) * shape.dim_out;
  }
  // The chunk tree's arrival counters [sample tiles, num_chunks] (int32, zero between
  // launches): the node whose right child's first chunk is `chunk`.
  C10_HOST_DEVICE int64_t tree_counter(int64_t tile, int64_t chunk) const { return tile * part.num_chunks + chunk; }
  // The op's couplings output [B, I, J]: c[b, i, j].
  C10_HOST_DEVICE int64_t coupling(int64_t b, int64_t i, int64_t j) const {
    return (b * shape.num_in + i) * shape.num_out + j;
  }
  // Backward: the per-sample vectors of the product terms [B, terms, J, D]: [b, t, j, :].
  C10_HOST_DEVICE int64_t term_vector(int64_t b, int64_t t, int64_t j) const {
    return ((b * part.terms + t) * shape.num_out + j) * shape.dim_out;
  }
  // Backward: per-(b, i, j) coefficients [slots, I, J, B'], sample fastest, B' = the batch
  // rounded up to whole sample tiles and 16 bytes (a warp of the routing kernels holds
  // consecutive samples, so its stores are whole lines, and its samples past the batch read
  // within the workspace; a gradient thread reads the coefficients of consecutive samples
  // with one aligned 16-byte load). Entries past B are never written.
  C10_HOST_DEVICE int64_t coefficient(int64_t slot, int64_t i, int64_t j, int64_t b) const {
    return ((slot * shape.num_in + i) * shape.num_out + j) * part.coefficient_batch + b;
  }
};

// The distances, in elements, between what the gradient kernels walk while they form
// dL/du_hat (32 bits: the planner keeps every workspace below 2^31 elements). The host
// computes them once per launch: a gradient thread, whose registers hold rows of W and dW,
// then reads each as a kernel parameter instead of re-deriving it from the shape for every
// sample.
struct GradientStrides {
  int terms;              // product terms (BackwardTerms::count)
  bool first_stored;      // term 0's coefficient is in slot 0, else it is the initial coupling
  int coefficient_slot;   // between coefficient slots: I * J * B'
  int prior_slot;         // from slot 0 to G_0's slot
  int term;               // between a sample's term vectors: J * D
  int sample_terms;       // between consecutive samples' term vectors: terms * term (where a sample's end)
  int sample_input;       // between consecutive samples' rows of u: I * E
};

C10_HOST_DEVICE inline GradientStrides gradient_strides(const RoutingGeometry& g, const BackwardTerms& terms) {
  const int slot = int(g.shape.num_in * g.shape.num_out * g.part.coefficient_batch);
  return GradientStrides{
      terms.count(), terms.stored_coefficient(0), slot, terms.logit_grad_slot(0) * slot, int(g.columns()),
      int(terms.count() * g.columns()), int(g.shape.num_in * g.shape.dim_in)};
}

}  // namespace capsnet::cuda
