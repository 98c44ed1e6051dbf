// Scratch memory of the CPU kernels, kept between calls.
//
// A training loop calls the op with the same shapes again and again; its scratch (the
// backward's planes, 24 MB at B=128 for CapsNet; the per-thread workspaces; the blocked
// copies of u and W) would otherwise be fresh memory on every call, which the operating
// system maps, zeroes and unmaps each time (15% of the time of a forward and backward at
// B=128). Released buffers are kept, up to kCachedBytes in all, and handed out again.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace capsnet {
namespace cpu {

// Up to this much released scratch is kept for later calls; more is freed at once.
constexpr int64_t kCachedBytes = int64_t(64) << 20;

// A buffer of at least `count` elements of `dtype`, 64-byte aligned, uninitialised; goes
// back to the cache when destroyed.
class Scratch {
 public:
  Scratch(int64_t count, at::ScalarType dtype);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <typename T>
  T* data() const {
    return static_cast<T*>(buffer_.mutable_data_ptr());
  }
  // A tensor view of the first `count` elements (valid while this Scratch lives).
  at::Tensor tensor(at::IntArrayRef sizes) const;

 private:
  at::Tensor buffer_;  // bytes
  at::ScalarType dtype_;
};

}  // namespace cpu
}  // namespace capsnet
