// Sizes, tile classes and memory layouts of the CUDA routing kernels.
//
// Shared by the kernels (routing_kernel.cuh, compiled by nvcc and by the CPU emulator in
// csrc/simt), the launch planner (routing_launch.h) and the host code (routing_host.h), so
// that every party agrees on where each element lives and on the compile-time bounds.
//
// Notation (docs/CUDA.md):  B samples, I = N_in input capsules, J = N_out output capsules,
// D = D_out, E = D_in, r routing iterations. Iterations are counted from 0 here (k = 0..r-1).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace capsnet::cuda {

// ---------------------------------------------------------------------------------------
// Tile classes: compile-time bounds of the per-thread vectors.
//
// The kernels keep one D_out-vector per (sample, output capsule) in registers, which needs
// the bound at compile time. A tile class fixes those bounds; the planner picks the class
// for a shape and the kernels are instantiated once per class.
// ---------------------------------------------------------------------------------------

// The CapsNet shape (D_in = 8, D_out = 16) and anything with D_in == 8, D_out <= 16: rows of
// u and W are read as 16-byte vectors (they are 32 B for float), and the register budget of
// 128 per thread (512 threads per block) holds the four D_out-vectors of the backward pass.
struct CapsNetTile {
  static constexpr int kMaxDimOut = 16;
  static constexpr int kMaxDimIn = 8;
  static constexpr bool kExactDimIn = true;  // D_in must equal kMaxDimIn
  static constexpr int kMaxThreads = 512;    // __launch_bounds__ of the routing kernels
  static constexpr int kGradWeightInputs = 8;  // inputs per block of grad_weight_kernel
};

// Every other supported shape (D_in, D_out <= 32, N_out <= 1024). Correct, not tuned: its
// register arrays spill to local memory when the dimensions are large.
struct GenericTile {
  static constexpr int kMaxDimOut = 32;
  static constexpr int kMaxDimIn = 32;
  static constexpr bool kExactDimIn = false;
  static constexpr int kMaxThreads = 1024;
  static constexpr int kGradWeightInputs = 2;
};

// Threads per block of the kernels that give each thread one (j, d) column: the squash
// kernels and grad_weight_kernel (whose launch bound allows 255 registers per thread).
constexpr int kColumnKernelMaxThreads = 256;

// Shared memory of the routing kernels (routing_kernel.cuh), in elements:
//  - CapsuleExchange: two buffers of [N_out][samples_per_block], used in turn;
//  - CouplingStaging (forward only): [samples_per_block * N_out][coupling_run + 1], where
//    the run is the number of consecutive inputs staged before a store: ideally those whose
//    couplings fill one 32-byte memory sector (RoutingSizes::coupling_run).
constexpr int kExchangeBuffers = 2;
constexpr int kSectorBytes = 32;

C10_HOST_DEVICE inline int64_t exchange_elements(int num_out, int samples_per_block) {
  return int64_t(kExchangeBuffers) * num_out * samples_per_block;
}
C10_HOST_DEVICE inline int64_t staging_elements(int num_out, int samples_per_block, int coupling_run) {
  return int64_t(num_out) * samples_per_block * (coupling_run + 1);
}

// ---------------------------------------------------------------------------------------
// Sizes of one call, with the partition of the work chosen by the planner.
// ---------------------------------------------------------------------------------------
struct RoutingSizes {
  int64_t batch;       // B
  int64_t num_in;      // I
  int num_out;         // J
  int dim_out;         // D
  int dim_in;          // E
  int iterations;      // r
  // Partition of the inputs (and samples) among the blocks of the routing kernels.
  int64_t inputs_per_chunk;  // consecutive input capsules per block
  int64_t num_chunks;        // ceil(I / inputs_per_chunk); each writes one partial sum
  int samples_per_block;     // blockDim.x of the routing kernels (blockDim.y = J)
  int coupling_run;          // inputs per staged store of the forward's couplings

  C10_HOST_DEVICE int64_t columns() const { return int64_t(num_out) * dim_out; }

  // u [B, I, E]: the row u[b, i, :].
  C10_HOST_DEVICE int64_t input_row(int64_t b, int64_t i) const {
    return (b * num_in + i) * dim_in;
  }
  // W [I, J, D, E]: the matrix W[i, j] (D rows of E).
  C10_HOST_DEVICE int64_t weight_matrix(int64_t i, int64_t j) const {
    return (i * num_out + j) * int64_t(dim_out) * dim_in;
  }
  // v and grad_v [B, J, D]: the vector v[b, j, :].
  C10_HOST_DEVICE int64_t output_vector(int64_t b, int64_t j) const {
    return (b * num_out + j) * dim_out;
  }
  // Per-iteration state [B, r, J, D] (s_saved, and the backward's grad_s and v): [b, k, j, :].
  C10_HOST_DEVICE int64_t iteration_vector(int64_t b, int64_t k, int64_t j) const {
    return ((b * iterations + k) * num_out + j) * dim_out;
  }
  // Partial sums over one input chunk [B, num_chunks, J, D]: [b, chunk, j, :].
  C10_HOST_DEVICE int64_t partial_vector(int64_t b, int64_t chunk, int64_t j) const {
    return ((b * num_chunks + chunk) * num_out + j) * dim_out;
  }
  // The op's couplings [B, r, J, I] (the contract of csrc/routing.cpp): c_k[i, j].
  C10_HOST_DEVICE int64_t coupling(int64_t b, int64_t k, int64_t j, int64_t i) const {
    return ((b * iterations + k) * num_out + j) * num_in + i;
  }
  // The backward's logit gradients G_m = dL/db_m, m = 1..r-1, in a workspace [r - 1, I, J, B]:
  // sample fastest, so that a warp, whose lanes hold consecutive samples, touches
  // consecutive words. (G_0 is never needed: b_0 = 0 is a constant.)
  C10_HOST_DEVICE int64_t logit_grad(int64_t m, int64_t i, int64_t j, int64_t b) const {
    return (((m - 1) * num_in + i) * num_out + j) * batch + b;
  }
};

}  // namespace capsnet::cuda
