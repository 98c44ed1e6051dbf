// What the ATen-facing CPU driver (routing_cpu.cpp) and the compute kernels (kernels/,
// compiled once per instruction set) share: the problem descriptions, passed as raw
// pointers into block-major layouts, and the table of kernel entry points of one variant.
//
// Plain C++ only (no ATen): the kernels are compiled with -march flags the driver is not,
// and nothing from a library header may be instantiated there (see kernels/variant.h).
//
// Block-major layouts. Input capsules are grouped into blocks of kCapsuleBlockBytes (32
// floats or 16 doubles, zero-padded past N_in): the kernels vectorise over the input
// capsules of a block, whatever the vector width of their instruction set.
//   u_blocked      [B, blocks, D_in, L]               u, per block transposed
//   W_blocked      [blocks, N_out*D_out, D_in, L]      W, per block transposed
//   prior_blocked  [blocks, N_out, L]                  logit_prior transposed
// with L = capsule_block<T>() and blocks = ceil(N_in / L).
#pragma once

#include <cstdint>

#include "routing_math.h"

namespace capsnet {
namespace cpu {

constexpr int64_t kCapsuleBlockBytes = 128;

template <typename T>
constexpr int64_t capsule_block() {
  return kCapsuleBlockBytes / static_cast<int64_t>(sizeof(T));
}

inline int64_t num_capsule_blocks(int64_t num_in, int64_t block) {
  return (num_in + block - 1) / block;
}

template <typename T>
struct ForwardProblem {
  RoutingShape shape;
  RoutingOptions options;
  const T* u_blocked;
  const T* W_blocked;
  const T* bias;           // [N_out*D_out] or nullptr
  const T* prior_blocked;  // or nullptr
  T* v;                    // [B, N_out*D_out]
  T* s_saved;              // [B, r, N_out*D_out]
  T* couplings;            // [B, N_in, N_out] (the last iteration's) or nullptr
};

// Backward runs in two phases over chunks of samples (see routing_cpu.cpp). Phase 1 (per
// sample) writes what phase 2 (per block of input capsules) needs to rebuild the gradient
// of u_hat:  grad u_hat[j|i] = constant[j] + sum_k plane_k[i, j] * vector_k[j]  (vectors
// over D_out), a short sum of per-(i, j) coefficients times per-j vectors. The vectors are
// stored interleaved, [N_out*D_out, terms + 1] (the constant last), so that phase 2 finds
// all of a row's values together.
struct BackwardTerms {
  int64_t terms;     // coefficient planes that multiply a vector
  bool prior_plane;  // one more plane: the sample's gradient of the logit prior
  int64_t planes() const { return terms + (prior_plane ? 1 : 0); }
  int64_t vectors() const { return terms + 1; }  // the terms' vectors, then the constant
};

// With 0-based iterations t, logits b_t = prior + <u_hat, v_0 + ... + v_{t-1}> and
// Gb_t = sum_{t' >= t} dL/db_t':
//   grad u_hat = sum_t c_t grad_s_t + sum_{t >= 1} Gb_t v_{t-1}
// Terms, in the order phase 1 writes them: for t = r-1 .. 1 the pair (c_t, grad_s_t),
// (Gb_t, v_{t-1}); then (c_0, grad_s_0) when there is a prior. Without a prior c_0 is the
// uniform coupling, a constant: its term is the constant vector. The prior plane is Gb_0.
// (detach_routing takes its own path, see RoutingKernels::detached_block.)
inline BackwardTerms backward_terms(const RoutingShape& shape, bool has_prior) {
  return {2 * (shape.iterations - 1) + (has_prior ? 1 : 0), has_prior};
}

template <typename T>
struct BackwardProblem {
  RoutingShape shape;
  RoutingOptions options;
  BackwardTerms terms;
  const T* u_blocked;
  const T* W_blocked;
  const T* prior_blocked;  // or nullptr
  const T* s_saved;        // [B, r, N_out*D_out]
  const T* grad_v;         // [B, N_out*D_out]
  // Phase 1's results for the samples of the current chunk (index n relative to the chunk).
  // Block-major, so that phase 2 reads one block's planes of all the chunk's samples in one
  // sequential sweep.
  int64_t chunk_samples;
  T* planes;   // [blocks, chunk_samples, terms.planes(), N_out, L]; unused by detach_routing
  T* vectors;  // [chunk, N_out*D_out, terms.vectors()]; detach_routing: [B, 2, N_out*D_out]
  T* grad_s_sum;  // [B, N_out*D_out]: sum over iterations of grad s (the bias gradient per sample)
  // Phase 2's outputs, natural layouts; the first chunk writes them, later chunks add.
  T* grad_u;               // [B, N_in, D_in]
  T* grad_W;               // [N_in, N_out, D_out, D_in]
  T* grad_prior_blocked;   // [blocks, N_out, L] or nullptr
};

// The kernels of one instruction-set variant, for one dtype. Workspace sizes are in
// elements of T, per task; the driver allocates one workspace per thread (64-byte aligned).
template <typename T>
struct RoutingKernels {
  // Samples handled by one task of the forward and of backward phase 1 (they share one
  // sweep over W for their predictions); a function of the shape alone.
  int64_t (*samples_per_task)(const RoutingShape& shape);
  int64_t (*sample_workspace_size)(const RoutingShape& shape);
  // Forward of samples [begin, end).
  void (*forward)(const ForwardProblem<T>& problem, int64_t begin, int64_t end, T* workspace);
  // Backward phase 1 of samples [begin, end) of the chunk that starts at chunk_begin.
  void (*backward_samples)(
      const BackwardProblem<T>& problem, int64_t chunk_begin, int64_t begin, int64_t end, T* workspace);
  int64_t (*block_workspace_size)(const RoutingShape& shape);
  // Backward phase 2 of one block of input capsules over the chunk's samples [begin, end).
  void (*backward_block)(
      const BackwardProblem<T>& problem, int64_t block, int64_t begin, int64_t end, bool first_chunk,
      T* workspace);
  // detach_routing, in one chunk: the per-sample vectors of samples [begin, end) (a workspace
  // of N_out*D_out elements), then everything else per block of input capsules.
  void (*detached_samples)(const BackwardProblem<T>& problem, int64_t begin, int64_t end, T* workspace);
  int64_t (*detached_block_workspace_size)(const RoutingShape& shape);
  void (*detached_block)(const BackwardProblem<T>& problem, int64_t block, T* workspace);
};

struct KernelVariant {
  const char* name;
  RoutingKernels<float> f32;
  RoutingKernels<double> f64;
};

}  // namespace cpu
}  // namespace capsnet
