// An experiment, not part of the library: does staging the next inputs' W and u in shared
// memory with asynchronous copies hide the round trip to L2 that the routing kernels pay
// once per input capsule? (docs/CUDA.md, "Measured on an H200": about 1.3 us per input
// where the issue rate says 0.4.)
//
// Both kernels run the input loop of forward_iteration_kernel<kUniformFirst> (CapsNet tile,
// float32): block (16 lanes, J), two samples per thread, partial[s][d] += W[i, j] u[s][i]
// over the chunk's inputs, through the library's add_prediction (the same order of
// operations, so both kernels' sums are bitwise the same), and store the chunk's partial sums
// (no chunk tree: the loop is what is measured).
//   kStages == 0: W and u are loaded from global memory where they are used, as the library does.
//   kStages >= 2: a ring of kStages slots in shared memory; while input i is computed from its
//   slot, the copies of inputs i+1 .. i+kStages-1 are in flight (cp.async on sm_80 and later,
//   which needs no registers for them; before sm_80 the pipeline primitives copy synchronously).
// The copies go through the library's primitives (copy16_async, commit_copies,
// wait_for_copies: routing_staging.cuh), whose InputRing is this ring in the library's
// forward kernels (the default on sm_80 and later); the experiment isolates the loop.
// benchmarks/staging_experiment.py builds and times them (input_loop.cu launches them);
// tests/test_gpu_experiments.py runs them on the CPU emulator (emulated_input_loop.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda/routing_staging.cuh"
#include "input_loop.h"

namespace capsnet::cuda::staging_experiment {

using Tile = CapsNetTile;
constexpr int kSamples = samples_per_thread<Tile>(int(sizeof(float)));
constexpr int kBlockSamples = Tile::kLanes * kSamples;
constexpr int kDim = Tile::kMaxDimOut;
constexpr int kDimIn = Tile::kMaxDimIn;
constexpr int kMatrix = kDim * kDimIn;  // floats of one W[i, j]
// A slot's layout is the library's (input_slot_floats, routing_layout.h): the W slab, then
// the u rows kInputRowStride floats (48 bytes) apart, so that the 16-byte loads of 8
// consecutive lanes hit different banks (32 bytes apart, two lanes would share one).
constexpr int kPiece = int(16 / sizeof(float));  // floats per 16-byte copy
// A slab's pieces per thread at most (J = kMaxNumOut: 320 pieces, 160 threads): a loop
// unrolled at compile time.
constexpr int kMaxPiecesPerThread = (Tile::kMaxNumOut * kMatrix / kPiece + Tile::kMaxThreads - 1) / Tile::kMaxThreads;

inline size_t shared_bytes(int stages, int num_out) {
  return size_t(stages) * size_t(input_slot_floats(num_out)) * sizeof(float);
}

// Grid (sample tiles, chunks) and block (lanes, J), as the library's routing launches.
inline dim3 loop_grid(const LoopProblem& p) {
  return dim3(unsigned((p.batch + kBlockSamples - 1) / kBlockSamples),
              unsigned((p.num_in + p.inputs_per_chunk - 1) / p.inputs_per_chunk));
}
inline dim3 loop_block(const LoopProblem& p) { return dim3(unsigned(Tile::kLanes), unsigned(p.num_out)); }

// launch(std::integral_constant<int, kStages>{}) for a run-time stage count; false (nothing
// called) for a count without a kernel.
template <typename Launch>
bool with_stages(int stages, Launch&& launch) {
  switch (stages) {
    case 0: launch(std::integral_constant<int, 0>{}); return true;
    case 2: launch(std::integral_constant<int, 2>{}); return true;
    case 3: launch(std::integral_constant<int, 3>{}); return true;
    case 4: launch(std::integral_constant<int, 4>{}); return true;
    default: return false;
  }
}

template <int kStages>
__global__ void __launch_bounds__(Tile::kMaxThreads, Tile::kMinBlocks) input_loop_kernel(const LoopProblem p) {
  const int lane = threadIdx.x;
  const int j = threadIdx.y;
  const int flat = j * Tile::kLanes + lane;
  const int threads = blockDim.x * blockDim.y;
  const int tile_first = blockIdx.x * kBlockSamples;
  const int i_begin = blockIdx.y * p.inputs_per_chunk;
  const int inputs = smaller(p.inputs_per_chunk, p.num_in - i_begin);
  const int slab = p.num_out * kMatrix;  // W[i, :] (all J matrices of input i): contiguous
  // Samples past the batch read sample B-1's rows, as in the library.
  const auto read_sample = [&](int slot) { return smaller(tile_first + slot, p.batch - 1); };

  float sums[kSamples][kDim];
  fill(sums, 0.0f);
  if constexpr (kStages == 0) {
    for (int input = 0; input < inputs; ++input) {
      const int i = i_begin + input;
      float u_i[kSamples][kDimIn];
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        load_row<Tile>(p.u + (int64_t(read_sample(s * Tile::kLanes + lane)) * p.num_in + i) * kDimIn, kDimIn, u_i[s]);
      }
      add_prediction<Tile>(p.W + int64_t(i) * slab + j * kMatrix, u_i, kDim, kDimIn, sums);
    }
  } else {
    static_assert(kStages >= 2, "a ring needs a slot to compute from and one to fill");
    float* const ring = dynamic_shared_memory<float>();
    const int stage = int(input_slot_floats(p.num_out));
    // The block's copies of input `input` into slot `slot`: the W slab in 16-byte pieces
    // spread over all threads, and one piece per thread for the 32 u rows (two each).
    const auto fill_slot = [&](int input, int slot) {
      const float* W_slab = p.W + int64_t(i_begin + input) * slab;
      float* W_slot = ring + slot * stage;
#pragma unroll
      for (int k = 0; k < kMaxPiecesPerThread; ++k) {
        const int piece = flat + k * threads;
        if (piece < slab / kPiece) {
          copy16_async(W_slot + piece * kPiece, W_slab + piece * kPiece);
        }
      }
      if (flat < kBlockSamples * kDimIn / kPiece) {
        const int row = flat / (kDimIn / kPiece);
        const int part = flat % (kDimIn / kPiece);
        const float* source = p.u + (int64_t(read_sample(row)) * p.num_in + i_begin + input) * kDimIn + part * kPiece;
        copy16_async(W_slot + slab + row * kInputRowStride + part * kPiece, source);
      }
    };
    // One commit per input (an empty group past the chunk's end), so that "all but the
    // newest kStages - 2 groups are complete" always means "input `input` has arrived".
#pragma unroll
    for (int ahead = 0; ahead < kStages - 1; ++ahead) {
      if (ahead < inputs) {
        fill_slot(ahead, ahead);
      }
      commit_copies();
    }
    for (int input = 0; input < inputs; ++input) {
      wait_for_copies<kStages - 2>();
      // Every thread's copies of this input have landed, and every thread has finished
      // reading the slot that the next copies overwrite (that of input - 1).
      __syncthreads();
      const int next = input + kStages - 1;
      if (next < inputs) {
        fill_slot(next, next % kStages);
      }
      commit_copies();
      const float* slot = ring + (input % kStages) * stage;
      float u_i[kSamples][kDimIn];
#pragma unroll
      for (int s = 0; s < kSamples; ++s) {
        load_row<Tile>(slot + slab + (s * Tile::kLanes + lane) * kInputRowStride, kDimIn, u_i[s]);
      }
      add_prediction<Tile>(slot + j * kMatrix, u_i, kDim, kDimIn, sums);
    }
  }
  // partials [chunks, B, J, D]
#pragma unroll
  for (int s = 0; s < kSamples; ++s) {
    const int b = tile_first + s * Tile::kLanes + lane;
    if (b < p.batch) {
      store_vector<true>(sums[s], kDim, p.partials + ((int64_t(blockIdx.y) * p.batch + b) * p.num_out + j) * kDim);
    }
  }
}

}  // namespace capsnet::cuda::staging_experiment
