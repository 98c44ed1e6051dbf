// The block-major layouts of the CPU kernels (see kernel_interface.h): the input capsule
// axis is zero-padded to whole blocks of L and moved innermost within each block.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace capsnet {
namespace cpu {

// x with dimension `dim` (the input capsules) zero-padded to a multiple of `block`.
inline at::Tensor pad_capsules(const at::Tensor& x, int64_t dim, int64_t block) {
  const int64_t count = x.size(dim);
  const int64_t padded = (count + block - 1) / block * block;
  if (padded == count) {
    return x;
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[dim] = padded;
  at::Tensor out = at::zeros(sizes, x.options());
  out.narrow(dim, 0, count).copy_(x);
  return out;
}

// u [B, N_in, D_in] -> [B, blocks, D_in, L]
inline at::Tensor block_inputs(const at::Tensor& u, int64_t block) {
  const at::Tensor padded = pad_capsules(u, 1, block);
  return padded.reshape({u.size(0), -1, block, u.size(2)}).permute({0, 1, 3, 2}).contiguous();
}

// W [N_in, N_out, D_out, D_in] (contiguous) -> [blocks, N_out*D_out, D_in, L]: per block a
// transpose of [L, N_out*D_out*D_in], written here rather than as a permuted copy because it
// runs on every call, on every element of W (for batch 1 it is most of the work).
template <typename T>
void block_weights_into(const T* W, T* out, int64_t num_in, int64_t row, int64_t block) {
  const int64_t blocks = (num_in + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* dst = out + b * row * block;
      const T* src = W + b * block * row;
      const int64_t width = std::min(block, num_in - b * block);
      if (width == block) {
        // Contiguous writes; the reads walk `block` rows side by side.
        for (int64_t x = 0; x < row; ++x) {
          for (int64_t lane = 0; lane < block; ++lane) {
            dst[x * block + lane] = src[lane * row + x];
          }
        }
      } else {
        for (int64_t x = 0; x < row; ++x) {
          for (int64_t lane = 0; lane < block; ++lane) {
            dst[x * block + lane] = lane < width ? src[lane * row + x] : T(0);
          }
        }
      }
    }
  });
}

inline at::Tensor block_weights(const at::Tensor& W, int64_t block) {
  const int64_t num_in = W.size(0);
  const int64_t row = W.size(1) * W.size(2) * W.size(3);
  const int64_t blocks = (num_in + block - 1) / block;
  at::Tensor out = at::empty({blocks, W.size(1) * W.size(2), W.size(3), block}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "capsnet_block_weights", [&] {
    block_weights_into(W.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), num_in, row, block);
  });
  return out;
}

// logit_prior [N_in, N_out] -> [blocks, N_out, L]
inline at::Tensor block_prior(const at::Tensor& prior, int64_t block) {
  const at::Tensor padded = pad_capsules(prior, 0, block);
  return padded.reshape({-1, block, prior.size(1)}).permute({0, 2, 1}).contiguous();
}

// The inverse of block_prior: [blocks, N_out, L] -> [N_in, N_out]
inline at::Tensor unblock_prior(const at::Tensor& blocked, int64_t num_in) {
  return blocked.permute({0, 2, 1}).reshape({-1, blocked.size(1)}).narrow(0, 0, num_in).contiguous();
}

}  // namespace cpu
}  // namespace capsnet
