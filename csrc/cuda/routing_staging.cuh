// W and u of a routing kernel's input loop through a ring of shared-memory slots (CapsNet
// tile, float32 storage), for the GPUs where the loop waits on its loads: the forward's and
// the backward sweep's, by default where they fit (PlanChoices::staging_slots,
// PlanChoices::sweep_staging_slots).
//
// With direct loads, a routing block's threads load input i's rows of W and u from L2 (or
// memory) where the prediction uses them: one round trip per input capsule that two blocks
// of 5 warps per SM cannot hide (docs/CUDA.md, "Measured on an H200"). The ring instead
// copies input i + kSlots - 1 into its slot with asynchronous 16-byte copies (cp.async on
// sm_80 and later, which hold no registers while in flight; before sm_80 the pipeline
// primitives copy synchronously) while input i is computed from its own slot.
//
// The block copies, per input: the W slab W[i, :, :, :] (J * D * E floats, contiguous), each
// thread (lane, j) two 16-byte pieces of its own matrix W[i, j]; and the u rows of the
// block's samples (32 rows of 8 floats), one 16-byte piece per thread for the first 64
// threads (so J >= 4: kMinStagedNumOut). The prediction then reads exactly the
// values it would have loaded, in the same order: the results are bitwise those of the
// direct loads (tests/test_cuda_emulated.py).
//
// On the emulator (csrc/simt) a copy lands at once: a slot overwritten while another thread
// still reads it then shows up as results that differ between thread orders.
#pragma once

#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_pipeline.h>
#endif

#include "routing_device.cuh"

namespace capsnet::cuda {

// 16 bytes from global to shared memory, asynchronously on sm_80 and later (the rings, and
// the gradient kernel's u rows).
template <typename T>
__device__ __forceinline__ void copy16_async(T* __restrict__ shared_destination, const T* __restrict__ global_source) {
  CAPSNET_ASSERT_VECTOR_ALIGNED(shared_destination);
  CAPSNET_ASSERT_VECTOR_ALIGNED(global_source);
#if defined(__CUDACC__)
  __pipeline_memcpy_async(shared_destination, global_source, 16);
#else
  std::memcpy(shared_destination, global_source, 16);
#endif
}

// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void commit_copies() {
#if defined(__CUDACC__)
  __pipeline_commit();
#endif
}

// Waits until all but this thread's kPending newest groups of copies have landed.
template <int kPending>
__device__ __forceinline__ void wait_for_copies() {
#if defined(__CUDACC__)
  __pipeline_wait_prior(kPending);
#endif
}

template <typename Tile, int kSlots>
struct InputRing {
  static_assert(Tile::kLanes > 0 && Tile::kExactDimIn && Tile::kExactDimOut, "the ring holds the CapsNet tile's rows");
  static_assert(kSlots >= 2, "a ring needs a slot to compute from and one to fill");
  static constexpr int kSamples = samples_per_thread<Tile>(4);
  static constexpr int kPiece = 4;  // floats per 16-byte copy
  static constexpr int kMatrix = Tile::kMaxDimOut * Tile::kMaxDimIn;
  static constexpr int kMatrixPiecesPerLane = kMatrix / kPiece / Tile::kLanes;
  static constexpr int kRowPieces = Tile::kMaxDimIn / kPiece;
  // The u pieces of a slot: one per thread for the first kUPieces threads of the block
  // (the planner stages only blocks of at least that many threads: kMinStagedNumOut).
  static constexpr int kUPieces = Tile::kLanes * kSamples * kRowPieces;
  static_assert(kMatrix / kPiece % Tile::kLanes == 0, "a matrix must split evenly over the lanes");
  static_assert(kUPieces == kMinStagedNumOut * Tile::kLanes, "one u piece per thread of the smallest staged block");

  float* slots;      // [kSlots][input_slot_floats(J)]
  int slot_floats;   // input_slot_floats(J)
  int ring_floats;   // kSlots * slot_floats
  int read_slot;     // where the slot of the next input to compute starts in the ring
  int fill_slot;     // ... and that of the next input to copy
  int slab;          // J * kMatrix: W[i, :] and where the u rows start in a slot
  // The next copies of this thread: their offsets in W, in u (-1: no u piece) and in a slot.
  int W_source;
  int u_source;
  int W_destination;
  int u_destination;

  // The ring after a routing kernel's exchange buffers and `row_kinds` kinds of thread rows
  // (the forward's V_k; the sweep's V_m and gs_m), with the calling thread's share of the
  // copies of its chunk's first input.
  __device__ static InputRing locate(const RoutingGeometry& g, const RoutingThread<Tile, kSamples>& t, int row_kinds) {
    const int threads = int(blockDim.x * blockDim.y);
    InputRing ring;
    ring.slots = dynamic_shared_memory<float>() + exchange_elements<Tile>(g.shape.num_out, g.part.lanes, 4) +
                 thread_row_elements<Tile>(threads, row_kinds, 4);
    ring.slot_floats = int(input_slot_floats(g.shape.num_out));
    ring.ring_floats = kSlots * ring.slot_floats;
    ring.read_slot = 0;
    ring.fill_slot = 0;
    ring.slab = int(g.shape.num_out) * kMatrix;
    // Its own matrix W[i, j]: pieces lane, lane + 16, ... (32-bit: the planner keeps W
    // below 2^31 elements).
    ring.W_destination = t.j * kMatrix + t.lane * kPiece;
    ring.W_source = t.i_begin * ring.slab + ring.W_destination;
    // u piece `flat`: part `flat % kRowPieces` of the row of the block's sample slot
    // flat / kRowPieces (s * lanes + lane); past the batch, sample B-1's row.
    const int flat = t.flat();
    const int row = flat / kRowPieces;
    const int part = flat % kRowPieces;
    const int b = smaller(int(blockIdx.x) * g.part.samples_per_block + row, int(g.shape.batch) - 1);
    ring.u_source = flat < kUPieces ? int(g.input_row(b, t.i_begin)) + part * kPiece : -1;
    ring.u_destination = ring.slab + row * kInputRowStride + part * kPiece;
    return ring;
  }

  // Before the loop: inputs 0 .. kSlots - 2 on their way, one group of copies each (empty
  // past the chunk's end, so that group n always holds input n).
  __device__ void start(const float* __restrict__ W, const float* __restrict__ u, int inputs) {
#pragma unroll
    for (int ahead = 0; ahead + 1 < kSlots; ++ahead) {
      if (ahead < inputs) {
        fill(W, u);
      }
      commit_copies();
    }
  }

  // The slot of input `input` (0, 1, ... in order), once every thread's copies into it have
  // landed; sends input + kSlots - 1 on its way into the slot that input - 1 used. Every
  // thread of the block calls it.
  __device__ const float* arrive(const float* __restrict__ W, const float* __restrict__ u, int input, int inputs) {
    wait_for_copies<kSlots - 2>();
    // Every thread's copies of this input have landed, and every thread has finished
    // reading the slot that the next copies overwrite (that of input - 1).
    __syncthreads();
    if (input + kSlots - 1 < inputs) {
      fill(W, u);
    }
    commit_copies();
    const float* slot = slots + read_slot;
    read_slot = next_slot(read_slot);
    return slot;
  }

  // Where the thread's rows are in a slot.
  __device__ const float* weights(const float* slot, int j) const { return slot + j * kMatrix; }
  __device__ const float* input_row(const float* slot, int s, int lane) const {
    return slot + slab + (s * Tile::kLanes + lane) * kInputRowStride;
  }

 private:
  __device__ int next_slot(int slot) const {
    slot += slot_floats;
    return slot == ring_floats ? 0 : slot;
  }

  // This thread's copies of the next input into the next slot to fill.
  __device__ void fill(const float* __restrict__ W, const float* __restrict__ u) {
    float* const slot = slots + fill_slot;
#pragma unroll
    for (int k = 0; k < kMatrixPiecesPerLane; ++k) {
      const int piece = k * Tile::kLanes * kPiece;
      copy16_async(slot + W_destination + piece, W + W_source + piece);
    }
    if (u_source >= 0) {
      copy16_async(slot + u_destination, u + u_source);
      u_source += Tile::kMaxDimIn;
    }
    W_source += slab;
    fill_slot = next_slot(fill_slot);
  }
};

// What a kernel with direct loads holds in place of a ring: nothing.
struct DirectInputs {};

// Where the calling thread reads input `input` of its chunk (0, 1, ... in order): its rows
// of u (u_rows) and its matrix W[i, j] (returned). DirectInputs: in global memory, at the
// offsets the kernel walks; an InputRing: in the input's slot, once its copies have landed
// (every thread of the block calls it for every input).
template <typename Tile, int kSamples, typename Ring, typename scalar_t>
__device__ __forceinline__ const scalar_t* input_rows(
    Ring& ring, const scalar_t* __restrict__ W, const scalar_t* __restrict__ u, int W_offset,
    const int (&u_offset)[kSamples], int input, const RoutingThread<Tile, kSamples>& t,
    const scalar_t* (&u_rows)[kSamples]) {
  if constexpr (std::is_same_v<Ring, DirectInputs>) {
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      u_rows[s] = u + u_offset[s];
    }
    return W + W_offset;
  } else {
    const float* slot = ring.arrive(W, u, input, t.inputs);
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      u_rows[s] = ring.input_row(slot, s, t.lane);
    }
    return ring.weights(slot, t.j);
  }
}

}  // namespace capsnet::cuda
