// simt: a CPU emulation of the CUDA execution model, to run CUDA kernels in tests without a GPU.
//
// Include this header, then a kernel source written for nvcc (e.g. csrc/cuda/routing_kernel.cuh),
// and compile with g++ (C++20). Each CUDA thread runs as its own fiber (an execution context
// with its own stack); the fibers of a block take turns on one OS thread and switch only at
// __syncthreads() or when they finish; blocks run one after another. What is and is not
// emulated: README.md in this folder.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <source_location>
#include <string>
#include <vector>

// ---- Qualifiers: plain C++ on the CPU.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory: a function-local static is one instance for every thread, which is
// what a block's shared memory is. Blocks run one at a time, so one instance serves the whole
// grid; like real shared memory it is not reset between blocks.
#define __shared__ static

// ---- Built-in vector types (only those the kernels use).
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

namespace simt {

// Who is running: the scheduler sets these before it resumes a CUDA thread.
struct ThreadState {
  dim3 thread_idx;
  dim3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dynamic_shared = nullptr;
};
extern thread_local ThreadState current;

// Blocks until every thread of the block has arrived at the same __syncthreads().
void sync_threads(const std::source_location& where);

// In which order the scheduler runs the blocks of a grid, and the threads of a block between
// two barriers. Running a kernel under several orders and comparing the results exposes a
// missing barrier: some order makes a thread read a value before or after it was written.
enum class Schedule { kAscending, kDescending, kShuffled };

// "ascending", "descending" or "shuffled".
Schedule parse_schedule(const std::string& name);

struct LaunchOptions {
  Schedule schedule = Schedule::kAscending;
  uint64_t seed = 0;  // for kShuffled
  int64_t max_threads_per_block = 1024;
  int64_t max_shared_bytes = 48 * 1024;  // dynamic shared memory per block
};

// kernel<<<grid, block, shared_bytes>>>(...): runs body() once per CUDA thread. `name` is
// recorded in the launch log (template arguments stripped); `launch_bound` is the kernel's
// __launch_bounds__ (0: none), which the block may not exceed. Errors (bad configuration, a
// divergent __syncthreads, a write past the dynamic shared memory, a misaligned vector
// load) throw std::runtime_error. A read or write well past the end of the dynamic shared
// memory hits an inaccessible guard page and ends the process with SIGSEGV, as it faults
// on a GPU.
void launch(
    const std::string& name, dim3 grid, dim3 block, size_t shared_bytes, const LaunchOptions& options,
    const std::function<void()>& body, int64_t launch_bound = 0);

// Called by the kernels' 16-byte vector loads (CAPSNET_ASSERT_VECTOR_ALIGNED): a GPU faults on
// a misaligned vector load, x86 does not, so the emulator records it and fails the launch.
void check_vector_alignment(const void* pointer, const std::source_location& where);

// A stream operation that is not a kernel (cudaMemsetAsync): recorded in the launch log
// under `name`, in order with the kernels.
void log_operation(const std::string& name);

// Kernel names launched since the last clear_launch_log(), in launch order.
const std::vector<std::string>& launch_log();
// The same launches with the names as given to launch() (template arguments included).
const std::vector<std::string>& full_launch_log();
void clear_launch_log();

}  // namespace simt

#define CAPSNET_ASSERT_VECTOR_ALIGNED(pointer) \
  ::simt::check_vector_alignment(pointer, std::source_location::current())

// ---- Built-in variables and functions.
#define threadIdx (::simt::current.thread_idx)
#define blockIdx (::simt::current.block_idx)
#define blockDim (::simt::current.block_dim)
#define gridDim (::simt::current.grid_dim)

inline void __syncthreads(const std::source_location where = std::source_location::current()) {
  ::simt::sync_threads(where);
}

// Atomics and memory fences. Blocks run one after another and a block's threads switch
// only at __syncthreads(), so a read-modify-write is atomic and every write is visible to
// every later block: the fence has nothing to order. (What blocks that run at the same
// time would see is not emulated; the kernels' fence and counter protocol is the standard
// one, routing_tree.cuh.)
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline void __threadfence() {}

// The block's dynamic shared memory (the `extern __shared__` array), sized at launch and
// filled with 0xFF bytes (NaN as float or double) before each block, so that reading an
// element no thread wrote shows up as NaN.
template <typename T>
T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(::simt::current.dynamic_shared);
}
