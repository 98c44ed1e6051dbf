// Small memory helpers of the kernels: plain loops instead of std::fill_n / std::copy_n
// (nothing from a library template is instantiated in the kernel objects, see variant.h),
// and software prefetching.
#pragma once

#include <cstdint>

#include "cpu/kernels/variant.h"

namespace capsnet {
namespace cpu {
namespace CAPSNET_CPU_VARIANT {

template <typename T>
C10_ALWAYS_INLINE void fill(T* x, int64_t n, T value) {
  for (int64_t k = 0; k < n; ++k) {
    x[k] = value;
  }
}

template <typename T>
C10_ALWAYS_INLINE void copy(const T* from, int64_t n, T* to) {
  for (int64_t k = 0; k < n; ++k) {
    to[k] = from[k];
  }
}

C10_ALWAYS_INLINE int64_t min_of(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Asks for [begin, end) to be brought into the caches ahead of use (the next samples'
// planes in backward phase 2, a sequence the hardware prefetchers do not guess).
template <typename T>
C10_ALWAYS_INLINE void prefetch_range(const T* begin, const T* end) {
  for (const char* line = reinterpret_cast<const char*>(begin); line < reinterpret_cast<const char*>(end);
       line += 64) {
    __builtin_prefetch(line);
  }
}

}  // namespace CAPSNET_CPU_VARIANT
}  // namespace cpu
}  // namespace capsnet
