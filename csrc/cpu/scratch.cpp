#include "cpu/scratch.h"

#include <mutex>
#include <vector>

namespace capsnet {
namespace cpu {
namespace {

std::mutex cache_mutex;
std::vector<at::Tensor>& cache() {
  static std::vector<at::Tensor> buffers;  // released byte buffers
  return buffers;
}

int64_t cached_bytes() {
  int64_t total = 0;
  for (const at::Tensor& buffer : cache()) {
    total += buffer.numel();
  }
  return total;
}

}  // namespace

Scratch::Scratch(int64_t count, at::ScalarType dtype) : dtype_(dtype) {
  const int64_t bytes = std::max<int64_t>(count, 1) * int64_t(c10::elementSize(dtype));
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    // The smallest cached buffer that is large enough and not more than twice as large.
    std::vector<at::Tensor>& buffers = cache();
    int64_t best = -1;
    for (int64_t k = 0; k < int64_t(buffers.size()); ++k) {
      const int64_t size = buffers[k].numel();
      if (size >= bytes && size <= 2 * bytes && (best < 0 || size < buffers[best].numel())) {
        best = k;
      }
    }
    if (best >= 0) {
      buffer_ = std::move(buffers[best]);
      buffers.erase(buffers.begin() + best);
      return;
    }
  }
  buffer_ = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
}

Scratch::~Scratch() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cached_bytes() + buffer_.numel() <= kCachedBytes) {
    cache().push_back(std::move(buffer_));
  }
}

at::Tensor Scratch::tensor(at::IntArrayRef sizes) const {
  return at::from_blob(buffer_.mutable_data_ptr(), sizes, at::TensorOptions().dtype(dtype_));
}

}  // namespace cpu
}  // namespace capsnet
