// The block-major layouts of the CPU kernels (see kernel_interface.h), made with ATen ops:
// the input capsule axis is zero-padded to whole blocks of L and moved innermost within
// each block.
#pragma once

#include <ATen/ATen.h>

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

// W [N_in, N_out, D_out, D_in] -> [blocks, N_out*D_out, D_in, L]
inline at::Tensor block_weights(const at::Tensor& W, int64_t block) {
  const at::Tensor padded = pad_capsules(W, 0, block);
  return padded.reshape({-1, block, W.size(1) * W.size(2), W.size(3)}).permute({0, 2, 3, 1}).contiguous();
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
