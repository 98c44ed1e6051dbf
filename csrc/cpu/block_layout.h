// The block-major layouts of the CPU kernels (see kernel_interface.h): the input capsule
// axis is zero-padded to whole blocks of L and moved innermost within each block. Each is a
// transpose per block, run on every call (for W, on every element of W).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/tile_transpose.h"

namespace capsnet {
namespace cpu {

// out[b, block, x, lane] = in[b, block * L + lane, x] (0 past `count` rows), for
// in [outer, count, row] and out [outer, blocks, row, L]: the common form of the layouts.
template <typename T>
void transpose_blocks(const T* in, T* out, int64_t outer, int64_t count, int64_t row, int64_t block) {
  const int64_t blocks = (count + block - 1) / block;
  at::parallel_for(0, outer * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / blocks;
      const int64_t first = (index % blocks) * block;
      const int64_t width = std::min(block, count - first);
      const T* src = in + (b * count + first) * row;
      T* dst = out + index * row * block;
      transpose_to_lanes(src, row, width, block, dst);
    }
  });
}

// u [B, N_in, D_in] -> [B, blocks, D_in, L]
template <typename T>
void block_inputs(const T* u, T* out, int64_t batch, int64_t num_in, int64_t dim_in, int64_t block) {
  transpose_blocks(u, out, batch, num_in, dim_in, block);
}

// W [N_in, N_out, D_out, D_in] -> [blocks, N_out*D_out, D_in, L]
template <typename T>
void block_weights(const T* W, T* out, int64_t num_in, int64_t row, int64_t block) {
  transpose_blocks(W, out, 1, num_in, row, block);
}

// logit_prior [N_in, N_out] -> [blocks, N_out, L]
template <typename T>
void block_prior(const T* prior, T* out, int64_t num_in, int64_t num_out, int64_t block) {
  transpose_blocks(prior, out, 1, num_in, num_out, block);
}

// The inverse of block_prior: [blocks, N_out, L] -> [N_in, N_out]
template <typename T>
void unblock_prior(const T* blocked, T* prior, int64_t num_in, int64_t num_out, int64_t block) {
  for (int64_t i = 0; i < num_in; ++i) {
    for (int64_t j = 0; j < num_out; ++j) {
      prior[i * num_out + j] = blocked[((i / block) * num_out + j) * block + i % block];
    }
  }
}

}  // namespace cpu
}  // namespace capsnet
