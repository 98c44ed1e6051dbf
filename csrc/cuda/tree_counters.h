// The chunk trees' arrival counters, kept from one call to the next.
//
// Every launch that adds chunks in a tree (routing_tree.cuh) leaves its counters at zero:
// the block that leaves a node resets the node's counter. So a buffer zeroed once, when it
// is allocated, serves every later call whose launches run after it in one stream: those
// calls start with no memset, one launch (and its gap) fewer in the forward and in the
// backward. Each stream of each device has its own buffer, so work on two streams never
// shares counters (streams are told apart by handle; PyTorch's come from fixed pools, so
// the buffers are few). A launch that failed may have stopped inside a tree: the launchers
// drop their stream's buffer then, and the next call zeroes a new one. Buffers larger than
// kMaxKeptCounters are not kept (zeroed per call instead), so what stays allocated is small.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace capsnet::cuda {

// 1 MiB of int32 counters: sample tiles x chunks for batches up to about 2^17 samples.
constexpr int64_t kMaxKeptCounters = int64_t(1) << 18;

class TreeCounterCache {
 public:
  // At least `numel` int32 zeros on `device`, for launches in the order of `stream`.
  // `zero(tensor)` sets a new buffer to zero in that order (cudaMemsetAsync on a GPU). With
  // `keep` false (a stream being captured into a CUDA graph) the buffer is a new one.
  template <typename Zero>
  at::Tensor take(
      const void* stream, const at::TensorOptions& options, int64_t numel, const Zero& zero, bool keep = true) {
    const at::TensorOptions counters = options.dtype(at::kInt);
    if (!keep || numel > kMaxKeptCounters) {
      at::Tensor fresh = at::empty({numel}, counters);
      zero(fresh);
      return fresh;
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    at::Tensor& kept = kept_[Key{options.device().index(), stream}];
    if (!kept.defined() || kept.numel() < numel) {
      // The buffer it replaces was used only in this stream's order, so the caching
      // allocator can hand its memory to later work on the same stream.
      kept = at::empty({numel}, counters);
      zero(kept);
    }
    return kept;
  }

  // Forgets `stream`'s buffer (after a failed launch); the next call zeroes a new one.
  void drop(const void* stream, c10::DeviceIndex device) {
    const std::lock_guard<std::mutex> lock(mutex_);
    kept_.erase(Key{device, stream});
  }

  // Forgets every buffer (the emulator's tests start from a clean state with it).
  void clear() {
    const std::lock_guard<std::mutex> lock(mutex_);
    kept_.clear();
  }

 private:
  using Key = std::pair<c10::DeviceIndex, const void*>;
  std::mutex mutex_;
  std::map<Key, at::Tensor> kept_;
};

}  // namespace capsnet::cuda
