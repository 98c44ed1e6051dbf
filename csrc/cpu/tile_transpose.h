// Square tiles of 16 bytes x 16 bytes transposed in registers (SSE2 on x86-64, NEON on
// aarch64: the baseline of every CPU torch runs on), and the matrix transpose built from
// them that moves data into the CPU kernels' block layouts (block_layout.h: u, W and the
// prior) and out of them (the kernels' grad u and grad W). Moving a tile through registers
// takes a quarter of the time of an element-by-element copy: for CapsNet's W, 0.22 ms
// instead of 0.96 ms (one thread, AMD EPYC Zen 4; a plain copy of W takes 0.14 ms), which
// matters at small batches, where these copies took more time than the routing itself.
//
// Every function here is static: the file is compiled into the driver and into each
// instruction-set variant of the kernels, and a function with external linkage would be
// merged by the linker into one copy, possibly one compiled for AVX-512 (kernels/variant.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace capsnet {
namespace cpu {

template <typename T>
struct Pack16Of;
template <>
struct Pack16Of<float> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Pack16Of<double> {
  typedef double type __attribute__((vector_size(16)));
};
template <typename T>
using Pack16 = typename Pack16Of<T>::type;
using ShuffleMask4 = int32_t __attribute__((vector_size(16)));
using ShuffleMask2 = int64_t __attribute__((vector_size(16)));

#if defined(__clang__)
#define CAPSNET_SHUFFLE4(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
#define CAPSNET_SHUFFLE2(a, b, i, j) __builtin_shufflevector(a, b, i, j)
#else
#define CAPSNET_SHUFFLE4(a, b, i, j, k, l) __builtin_shuffle(a, b, ShuffleMask4{i, j, k, l})
#define CAPSNET_SHUFFLE2(a, b, i, j) __builtin_shuffle(a, b, ShuffleMask2{i, j})
#endif

// The square tile of rows r[0..n) (n = elements per Pack16), transposed in registers.
static inline void transpose_tile(Pack16<float> (&r)[4]) {
  const Pack16<float> low01 = CAPSNET_SHUFFLE4(r[0], r[1], 0, 4, 1, 5);
  const Pack16<float> low23 = CAPSNET_SHUFFLE4(r[2], r[3], 0, 4, 1, 5);
  const Pack16<float> high01 = CAPSNET_SHUFFLE4(r[0], r[1], 2, 6, 3, 7);
  const Pack16<float> high23 = CAPSNET_SHUFFLE4(r[2], r[3], 2, 6, 3, 7);
  r[0] = CAPSNET_SHUFFLE4(low01, low23, 0, 1, 4, 5);
  r[1] = CAPSNET_SHUFFLE4(low01, low23, 2, 3, 6, 7);
  r[2] = CAPSNET_SHUFFLE4(high01, high23, 0, 1, 4, 5);
  r[3] = CAPSNET_SHUFFLE4(high01, high23, 2, 3, 6, 7);
}
static inline void transpose_tile(Pack16<double> (&r)[2]) {
  const Pack16<double> first = CAPSNET_SHUFFLE2(r[0], r[1], 0, 2);
  r[1] = CAPSNET_SHUFFLE2(r[0], r[1], 1, 3);
  r[0] = first;
}
#undef CAPSNET_SHUFFLE4
#undef CAPSNET_SHUFFLE2

// Elements per tile side.
template <typename T>
constexpr int64_t kTileSide = 16 / static_cast<int64_t>(sizeof(T));

// dst[c, r] = src[r, c] (kAdd: +=) for r < rows, c < cols; src and dst row-major with row
// strides src_stride and dst_stride. Whole tiles through registers, the edges one by one.
template <typename T, bool kAdd>
static inline void transpose_matrix(
    const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride) {
  constexpr int64_t kSide = kTileSide<T>;
  using Pack = Pack16<T>;
  const int64_t full_rows = rows - rows % kSide;
  const int64_t full_cols = cols - cols % kSide;
  for (int64_t c = 0; c < full_cols; c += kSide) {
    for (int64_t r = 0; r < full_rows; r += kSide) {
      Pack tile[kSide];
      for (int64_t t = 0; t < kSide; ++t) {
        std::memcpy(&tile[t], src + (r + t) * src_stride + c, sizeof(Pack));
      }
      transpose_tile(tile);
      for (int64_t t = 0; t < kSide; ++t) {
        T* out = dst + (c + t) * dst_stride + r;
        if constexpr (kAdd) {
          Pack sum;
          std::memcpy(&sum, out, sizeof(Pack));
          tile[t] += sum;
        }
        std::memcpy(out, &tile[t], sizeof(Pack));
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) {
      T& out = dst[c * dst_stride + r];
      out = kAdd ? out + src[r * src_stride + c] : src[r * src_stride + c];
    }
  }
}

// The rows src [width, row] (row stride `row`) become the lanes of dst [row, block]:
// dst[x, lane] = src[lane, x] for lane < width, 0 for width <= lane < block.
template <typename T>
static inline void transpose_to_lanes(const T* src, int64_t row, int64_t width, int64_t block, T* dst) {
  transpose_matrix<T, false>(src, row, width, row, dst, block);
  for (int64_t x = 0; width < block && x < row; ++x) {
    for (int64_t lane = width; lane < block; ++lane) {
      dst[x * block + lane] = T(0);
    }
  }
}

}  // namespace cpu
}  // namespace capsnet
