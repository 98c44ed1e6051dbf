// Kernels that test the emulator itself: that barriers and static shared memory work, that
// running under several schedules exposes a missing barrier, and that a divergent barrier,
// mismatched barriers, a shared-memory overflow, a misaligned vector load or a block above
// the launch bound raise an error (or, for an access past the shared memory's guard page,
// fault) instead of hanging or passing silently. Used by tests/test_cuda_emulated.py.
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "simt.h"
// After simt.h: the kernels' vector load, with the emulator's alignment check.
#include "cuda/routing_device.cuh"

namespace {

// out[block, t] = in[block, blockDim.x - 1 - t], through static shared memory. Without the
// barrier, a thread may read its partner's slot before the partner wrote it.
__global__ void reverse_in_block_kernel(const float* in, float* out, bool with_barrier) {
  __shared__ float tile[1024];
  const int t = threadIdx.x;
  const int64_t base = int64_t(blockIdx.x) * blockDim.x;
  tile[t] = in[base + t];
  if (with_barrier) {  // a kernel argument: uniform over the block, so the barrier is legal
    __syncthreads();
  }
  out[base + t] = tile[blockDim.x - 1 - t];
}

// Half of the threads skip the barrier: on a GPU this hangs or corrupts; here it raises.
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  }
}

// Every thread reaches a barrier, but not the same one.
__global__ void mismatched_barriers_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Writes one float past the `floats` the launch provides.
__global__ void shared_overflow_kernel(int floats) {
  float* shared = dynamic_shared_memory<float>();
  if (threadIdx.x == 0) {
    shared[floats] = 1.0f;
  }
}

// Reads element `index` of the dynamic shared memory (past its end: the guard page faults).
__global__ void read_shared_at_kernel(int index, float* out) {
  volatile float* shared = dynamic_shared_memory<float>();
  out[0] = shared[index];
}

// A 16-byte vector load `offset` floats into a 16-byte aligned buffer.
__global__ void vector_load_kernel(const float* data, int offset, float* out) {
  const capsnet::cuda::Vector16<float> v = capsnet::cuda::load_vector16(data + offset);
  out[0] = v.values[0];
}

// Reads dynamic shared memory that nobody wrote: the emulator's poison (NaN).
__global__ void read_unwritten_shared_kernel(float* out) {
  out[threadIdx.x] = dynamic_shared_memory<float>()[threadIdx.x];
}

simt::LaunchOptions options_for(const std::string& schedule, uint64_t seed) {
  simt::LaunchOptions options;
  options.schedule = simt::parse_schedule(schedule);
  options.seed = seed;
  return options;
}

// x: [blocks, threads] float32.
at::Tensor reverse_in_block(const at::Tensor& x, bool with_barrier, const std::string& schedule, uint64_t seed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) <= 1024, "x must be [blocks, <=1024] float32");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* in_data = in.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  simt::launch("reverse_in_block_kernel", dim3(unsigned(in.size(0))), dim3(unsigned(in.size(1))), 0,
      options_for(schedule, seed), [&] { reverse_in_block_kernel(in_data, out_data, with_barrier); });
  return out;
}

void divergent_barrier() {
  simt::launch("divergent_barrier_kernel", dim3(1), dim3(64), 0, options_for("ascending", 0),
      [] { divergent_barrier_kernel(); });
}

void mismatched_barriers() {
  simt::launch("mismatched_barriers_kernel", dim3(1), dim3(64), 0, options_for("ascending", 0),
      [] { mismatched_barriers_kernel(); });
}

void shared_overflow(int floats) {
  simt::launch("shared_overflow_kernel", dim3(1), dim3(32), floats * sizeof(float), options_for("ascending", 0),
      [&] { shared_overflow_kernel(floats); });
}

double read_shared_at(int floats, int index) {
  float out = 0;
  simt::launch("read_shared_at_kernel", dim3(1), dim3(1), floats * sizeof(float), options_for("ascending", 0),
      [&] { read_shared_at_kernel(index, &out); });
  return out;
}

double vector_load(int offset) {
  alignas(16) float data[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  float out = -1;
  simt::launch("vector_load_kernel", dim3(1), dim3(1), 0, options_for("ascending", 0),
      [&] { vector_load_kernel(data, offset, &out); });
  return out;
}

void launch_bounds(int threads) {
  simt::launch("bounded_kernel", dim3(1), dim3(unsigned(threads)), 0, options_for("ascending", 0), [] {}, 64);
}

at::Tensor read_unwritten_shared() {
  at::Tensor out = at::zeros({32}, at::kFloat);
  float* data = out.data_ptr<float>();
  simt::launch("read_unwritten_shared_kernel", dim3(1), dim3(32), 32 * sizeof(float), options_for("ascending", 0),
      [&] { read_unwritten_shared_kernel(data); });
  return out;
}

}  // namespace

void register_simt_selftests(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("selftest_reverse_in_block", &reverse_in_block, py::arg("x"), py::arg("with_barrier"),
      py::arg("schedule") = "ascending", py::arg("seed") = 0);
  m.def("selftest_divergent_barrier", &divergent_barrier);
  m.def("selftest_mismatched_barriers", &mismatched_barriers);
  m.def("selftest_shared_overflow", &shared_overflow, py::arg("floats"));
  m.def("selftest_read_shared_at", &read_shared_at, py::arg("floats"), py::arg("index"));
  m.def("selftest_vector_load", &vector_load, py::arg("offset"));
  m.def("selftest_launch_bounds", &launch_bounds, py::arg("threads"));
  m.def("selftest_read_unwritten_shared", &read_unwritten_shared);
}
