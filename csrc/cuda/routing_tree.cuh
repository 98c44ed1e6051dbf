// The sum over input chunks, across the blocks of one launch: the chunk tree.
//
// A routing kernel's block (sample tile, chunk) ends with partial sums over its chunk's
// input capsules (of s_k in the forward, of dL/dv_{m-1} in the backward); the whole sums
// are needed by the next step (squash, or squash backward), which costs little per sample.
// Instead of a separate kernel per step (a launch gap each), the chunks of a sample tile
// are added pairwise in a binary tree inside the same launch: at each level the block of
// the later of two sibling nodes to arrive adds the other's sum to its own and goes up;
// the block that arrives last at the root holds the tile's totals and does the next step.
// The tree's shape depends only on the number of chunks, and a + b == b + a, so the totals
// are bitwise the same whichever block arrives when (the emulated tests run blocks in
// several orders).
//
// A node's sum is kept in the partial-sum slot of its first chunk ([B, chunks, J, D]); each
// internal node has an int32 arrival counter ([sample tiles, chunks], the slot of its
// right child's first chunk), zero before the launch and reset to zero by the block that
// leaves it, so one zeroed buffer serves every launch of a call.
#pragma once

#include <type_traits>

#include "routing_device.cuh"

namespace capsnet::cuda {

// Loads another block's published vector: from L2 (ld.global.cg), never from this SM's L1,
// which other SMs' stores do not update.
template <bool kExact, int kMax, typename acc_t>
__device__ __forceinline__ void load_published_vector(const acc_t* src, int64_t count, acc_t (&dst)[kMax]) {
#if defined(__CUDACC__)
  if constexpr (kExact && (kMax * sizeof(acc_t)) % 16 == 0) {
    using Vector = std::conditional_t<sizeof(acc_t) == 4, float4, double2>;
    constexpr int kWidth = int(16 / sizeof(acc_t));
#pragma unroll
    for (int k = 0; k < kMax / kWidth; ++k) {
      const Vector chunk = __ldcg(reinterpret_cast<const Vector*>(src) + k);
      const acc_t* values = reinterpret_cast<const acc_t*>(&chunk);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        dst[k * kWidth + e] = values[e];
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      dst[k] = (kExact || k < count) ? __ldcg(src + k) : acc_t(0);
    }
  }
#else
  load_vector<kExact>(src, count, dst);  // the emulator runs blocks one after another
#endif
}

template <typename acc_t, typename Tile>
struct ChunkTree {
  static constexpr int kSamples = samples_per_thread<Tile>(int(sizeof(acc_t)));
  static constexpr int kDim = Tile::kMaxDimOut;
  static constexpr bool kExact = Tile::kExactDimOut;

  acc_t* partials;  // [B, chunks, J, D]
  int* counters;    // [sample tiles, chunks]

  // values[s]: this block's partial sums of (sample b[s], capsule j) over its chunk. Returns
  // true in the one block per sample tile that ends with the totals over all chunks in
  // `values`; false in the others, which are then done. Every thread of the block calls it.
  __device__ bool add_up(const RoutingGeometry& g, const RoutingThread<Tile, kSamples>& t, acc_t (&values)[kSamples][kDim]) const {
    __shared__ int arrived_first;
    const int chunks = int(g.part.num_chunks);
    const int dim = kExact ? kDim : int(g.shape.dim_out);
    // Offsets of partial_vector in 32 bits (the planner keeps every workspace below 2^31
    // elements): a few integer instructions per vector instead of 64-bit index arithmetic.
    const int vector_stride = int(g.shape.num_out * g.shape.dim_out);  // between chunks
    const int capsule_offset = t.j * int(g.shape.dim_out);
    const auto slot = [&](int b, int chunk) { return (b * chunks + chunk) * vector_stride + capsule_offset; };
    int node = t.chunk;
#pragma unroll 1
    // The model counts what the blocks of a tile do on average (benchmarks/cuda_model.py,
    // chunk_tree_counts): level l is visited by the ceil(chunks / 2^l) blocks still in the
    // tree, most of them with a sibling, and the later of two siblings goes on.
    for (int level = 0; level < g.part.chunk_levels; ++level) {  // model-loop: tree_level_visits
      const int nodes = ((chunks - 1) >> level) + 1;
      if ((node ^ 1) < nodes) {
        // model-fraction-begin: tree_pair_share
        // Publish this node's sums, then count the arrival at the parent.
#pragma unroll
        for (int s = 0; s < kSamples; ++s) {
          if (t.active[s]) {
            store_vector<kExact>(values[s], dim, partials + slot(t.b[s], node << level));
          }
        }
        __threadfence();  // the sums are visible to every block before the counter moves
        __syncthreads();
        if (t.lane == 0 && t.j == 0) {
          int* counter = counters + g.tree_counter(t.tile, (node | 1) << level);
          const int earlier = atomicAdd(counter, 1);
          if (earlier > 0) {
            *counter = 0;  // both children have arrived: zero for the next launch
          }
          arrived_first = earlier == 0;
        }
        __syncthreads();
        if (arrived_first) {
          return false;  // the sibling's block goes on with both sums
        }
        // model-fraction-begin: 1 / 2
        __threadfence();
#pragma unroll
        for (int s = 0; s < kSamples; ++s) {
          if (t.active[s]) {
            acc_t sibling[kDim];
            load_published_vector<kExact>(partials + slot(t.b[s], (node ^ 1) << level), dim, sibling);
#pragma unroll
            for (int d = 0; d < kDim; ++d) {
              values[s][d] += sibling[d];
            }
          }
        }
        // model-fraction-end
        // model-fraction-end
      }
      node >>= 1;
    }
    return true;
  }
};

}  // namespace capsnet::cuda
