// The scheduler behind simt.h: one fiber per CUDA thread, barriers, blocks in sequence.
//
// A fiber is a ucontext_t with its own stack. The scheduler of a block resumes each runnable
// fiber in turn; a fiber runs until it reaches __syncthreads() (it is then "at the barrier")
// or returns from the kernel ("finished"), and control comes back to the scheduler. When no
// fiber is runnable, either all are at the same barrier (release them all: next round), all
// have finished (the block is done), or the block is stuck: some wait at a barrier that
// others will never reach, which is a bug on a GPU too (it hangs or misbehaves there). The
// emulator reports it instead of hanging.
#include "simt.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>

// AddressSanitizer must be told when execution moves to another stack (make test-cuda-asan).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SIMT_WITH_ASAN 1
#else
#define SIMT_WITH_ASAN 0
#endif

namespace simt {

thread_local ThreadState current;

namespace {

// Where a fiber switch goes: ASan's bookkeeping around swapcontext (no-ops without ASan).
struct StackSwitch {
  void* fake_stack = nullptr;
  void begin(const void* bottom, size_t size, bool leaving_for_good = false) {
#if SIMT_WITH_ASAN
    __sanitizer_start_switch_fiber(leaving_for_good ? nullptr : &fake_stack, bottom, size);
#else
    (void)bottom, (void)size, (void)leaving_for_good;
#endif
  }
  void end(const void** from_bottom = nullptr, size_t* from_size = nullptr) {
#if SIMT_WITH_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, from_bottom, from_size);
#else
    (void)from_bottom, (void)from_size;
#endif
  }
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned char kCanary = 0xA5;  // between the end of the shared memory and the guard page
constexpr unsigned char kPoison = 0xFF;  // NaN in every byte position, for float and double

// A fiber's stack, with an inaccessible guard page below it: an overflow faults instead of
// silently corrupting the neighbouring stack.
class FiberStack {
 public:
  FiberStack() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    mapping_ = mmap(nullptr, kStackBytes + page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping_ == MAP_FAILED) {
      throw std::runtime_error("simt: cannot map a fiber stack");
    }
    mprotect(mapping_, page_, PROT_NONE);
  }
  ~FiberStack() { munmap(mapping_, kStackBytes + page_); }
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;

  void* bottom() const { return static_cast<char*>(mapping_) + page_; }
  size_t size() const { return kStackBytes; }

 private:
  void* mapping_;
  size_t page_;
};

// Stacks are reused across blocks and launches (mapping them is the slow part).
thread_local std::vector<std::unique_ptr<FiberStack>> stack_pool;

enum class FiberState { kRunnable, kAtBarrier, kFinished };

struct Fiber {
  ucontext_t context;
  FiberStack* stack;
  dim3 index;
  FiberState state;
  std::source_location barrier;  // where it waits, when kAtBarrier
};

std::string describe(const std::source_location& where) {
  std::ostringstream out;
  out << where.file_name() << ":" << where.line();
  return out.str();
}

bool same_place(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// The order in which to visit n items (blocks, or the threads of a block in one round).
std::vector<size_t> visiting_order(size_t n, Schedule schedule, std::mt19937_64& rng) {
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t(0));
  if (schedule == Schedule::kDescending) {
    std::reverse(order.begin(), order.end());
  } else if (schedule == Schedule::kShuffled) {
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

// Runs the blocks of one launch, one at a time.
class BlockRunner {
 public:
  BlockRunner(
      const std::string& kernel, dim3 block_dim, size_t shared_bytes, const LaunchOptions& options,
      const std::function<void()>& body)
      : kernel_(kernel), shared_bytes_(shared_bytes), options_(options), body_(body), rng_(options.seed) {
    const size_t threads = size_t(block_dim.x) * block_dim.y * block_dim.z;
    while (stack_pool.size() < threads) {
      stack_pool.push_back(std::make_unique<FiberStack>());
    }
    fibers_.resize(threads);
    for (size_t t = 0; t < threads; ++t) {
      fibers_[t].stack = stack_pool[t].get();
      // CUDA numbers threads with x fastest.
      fibers_[t].index = dim3(
          unsigned(t % block_dim.x), unsigned((t / block_dim.x) % block_dim.y),
          unsigned(t / (size_t(block_dim.x) * block_dim.y)));
    }
    // The dynamic shared memory ends (rounded up to 16 bytes, for vector accesses) right
    // before an inaccessible page: an access past it faults. The < 16 bytes of rounding
    // hold a canary, checked after each block.
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t rounded = (shared_bytes + 15) / 16 * 16;
    const size_t data_pages = (rounded + page_ - 1) / page_ + 1;  // at least one before the guard
    mapping_bytes_ = (data_pages + 1) * page_;
    mapping_ = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping_ == MAP_FAILED) {
      throw std::runtime_error("simt: cannot map shared memory");
    }
    unsigned char* guard = static_cast<unsigned char*>(mapping_) + data_pages * page_;
    mprotect(guard, page_, PROT_NONE);
    shared_ = guard - rounded;
    canary_bytes_ = rounded - shared_bytes;
  }
  ~BlockRunner() { munmap(mapping_, mapping_bytes_); }

  std::mt19937_64& rng() { return rng_; }

  void run_block(dim3 block_idx) {
    std::memset(shared_, kPoison, shared_bytes_);
    std::memset(shared_ + shared_bytes_, kCanary, canary_bytes_);
    current.block_idx = block_idx;
    current.dynamic_shared = shared_;
    for (Fiber& fiber : fibers_) {
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack->bottom();
      fiber.context.uc_stack.ss_size = fiber.stack->size();
      fiber.context.uc_link = &scheduler_;  // where a fiber goes when the kernel returns
      makecontext(&fiber.context, &BlockRunner::fiber_main, 0);
      fiber.state = FiberState::kRunnable;
    }
    BlockRunner* const outer = active;
    active = this;
    try {
      run_rounds();
    } catch (...) {
      active = outer;
      throw;
    }
    active = outer;
    for (size_t k = 0; k < canary_bytes_; ++k) {
      if (shared_[shared_bytes_ + k] != kCanary) {
        fail("wrote past the end of its " + std::to_string(shared_bytes_) + " bytes of dynamic shared memory");
      }
    }
    if (!misaligned_.empty()) {
      fail(misaligned_);
    }
  }

  // A misaligned vector load, reported when the block ends (kernels cannot throw).
  void record_misaligned(const void* pointer, const std::source_location& where) {
    if (misaligned_.empty()) {
      std::ostringstream out;
      out << "thread (" << running_->index.x << ", " << running_->index.y << ", " << running_->index.z
          << ") made a 16-byte vector load from " << pointer << ", which is not 16-byte aligned, at "
          << describe(where) << " (a GPU faults: misaligned address)";
      misaligned_ = out.str();
    }
  }

  // Called on the running fiber's stack by __syncthreads().
  void arrive_at_barrier(const std::source_location& where) {
    running_->state = FiberState::kAtBarrier;
    running_->barrier = where;
    StackSwitch to_scheduler;
    to_scheduler.begin(scheduler_stack_bottom_, scheduler_stack_size_);
    swapcontext(&running_->context, &scheduler_);
    to_scheduler.end();
  }

  static BlockRunner* active_runner() { return active; }

 private:
  static thread_local BlockRunner* active;

  static void fiber_main() {
    BlockRunner* runner = active;
    StackSwitch arrived;
    arrived.end(&runner->scheduler_stack_bottom_, &runner->scheduler_stack_size_);
    runner->body_();
    runner->running_->state = FiberState::kFinished;
    // Returning resumes uc_link, the scheduler; this stack is done for this block.
    StackSwitch leaving;
    leaving.begin(runner->scheduler_stack_bottom_, runner->scheduler_stack_size_, /*leaving_for_good=*/true);
  }

  void run_rounds() {
    for (;;) {
      for (size_t t : visiting_order(fibers_.size(), options_.schedule, rng_)) {
        Fiber& fiber = fibers_[t];
        if (fiber.state != FiberState::kRunnable) {
          continue;
        }
        running_ = &fiber;
        current.thread_idx = fiber.index;
        StackSwitch to_fiber;
        to_fiber.begin(fiber.stack->bottom(), fiber.stack->size());
        swapcontext(&scheduler_, &fiber.context);
        to_fiber.end();
      }
      running_ = nullptr;
      size_t finished = 0;
      const Fiber* waiting = nullptr;
      for (const Fiber& fiber : fibers_) {
        if (fiber.state == FiberState::kFinished) {
          ++finished;
        } else if (waiting == nullptr) {
          waiting = &fiber;
        } else if (!same_place(fiber.barrier, waiting->barrier)) {
          fail("threads wait at different __syncthreads(): " + describe(waiting->barrier) + " and " +
              describe(fiber.barrier) + " (divergent barrier)");
        }
      }
      if (finished == fibers_.size()) {
        return;
      }
      if (finished > 0) {
        fail(std::to_string(fibers_.size() - finished) + " threads wait at __syncthreads() (" +
            describe(waiting->barrier) + ") that " + std::to_string(finished) +
            " threads of the block will never reach: they returned (divergent barrier)");
      }
      for (Fiber& fiber : fibers_) {
        fiber.state = FiberState::kRunnable;
      }
    }
  }

  [[noreturn]] void fail(const std::string& what) const {
    std::ostringstream out;
    out << "simt: kernel " << kernel_ << ", block (" << current.block_idx.x << ", " << current.block_idx.y << ", "
        << current.block_idx.z << "): " << what;
    throw std::runtime_error(out.str());
  }

  std::string kernel_;
  size_t shared_bytes_;
  LaunchOptions options_;
  const std::function<void()>& body_;
  std::mt19937_64 rng_;
  std::vector<Fiber> fibers_;
  size_t page_ = 0;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  unsigned char* shared_ = nullptr;
  size_t canary_bytes_ = 0;
  std::string misaligned_;
  ucontext_t scheduler_;
  const void* scheduler_stack_bottom_ = nullptr;
  size_t scheduler_stack_size_ = 0;
  Fiber* running_ = nullptr;
};

thread_local BlockRunner* BlockRunner::active = nullptr;

thread_local std::vector<std::string> launched;
thread_local std::vector<std::string> launched_full;

std::string base_name(const std::string& name) {
  return name.substr(0, name.find_first_of("<( "));
}

void check_configuration(
    const std::string& kernel, dim3 grid, dim3 block, size_t shared_bytes, const LaunchOptions& options,
    int64_t launch_bound) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  std::string problem;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0) {
    problem = "a grid or block dimension is 0";
  } else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    problem = "grid too large";
  } else if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > options.max_threads_per_block) {
    problem = "block of " + std::to_string(threads) + " threads exceeds the limit of " +
        std::to_string(options.max_threads_per_block);
  } else if (launch_bound > 0 && threads > launch_bound) {
    problem = "block of " + std::to_string(threads) + " threads exceeds the kernel's __launch_bounds__ of " +
        std::to_string(launch_bound) + " (a GPU refuses the launch: too many resources requested)";
  } else if (int64_t(shared_bytes) > options.max_shared_bytes) {
    problem = std::to_string(shared_bytes) + " bytes of dynamic shared memory exceed the limit of " +
        std::to_string(options.max_shared_bytes);
  }
  if (!problem.empty()) {
    throw std::runtime_error("simt: invalid launch configuration for kernel " + kernel + ": " + problem);
  }
}

}  // namespace

Schedule parse_schedule(const std::string& name) {
  if (name == "ascending") {
    return Schedule::kAscending;
  }
  if (name == "descending") {
    return Schedule::kDescending;
  }
  if (name == "shuffled") {
    return Schedule::kShuffled;
  }
  throw std::invalid_argument("simt: schedule must be 'ascending', 'descending' or 'shuffled', got '" + name + "'");
}

void sync_threads(const std::source_location& where) {
  BlockRunner* runner = BlockRunner::active_runner();
  if (runner == nullptr) {
    throw std::logic_error("simt: __syncthreads() called outside a kernel launch");
  }
  runner->arrive_at_barrier(where);
}

void check_vector_alignment(const void* pointer, const std::source_location& where) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0) {
    return;
  }
  BlockRunner* runner = BlockRunner::active_runner();
  if (runner == nullptr) {
    throw std::runtime_error("simt: misaligned 16-byte vector load outside a kernel at " + describe(where));
  }
  runner->record_misaligned(pointer, where);
}

void launch(
    const std::string& name, dim3 grid, dim3 block, size_t shared_bytes, const LaunchOptions& options,
    const std::function<void()>& body, int64_t launch_bound) {
  check_configuration(name, grid, block, shared_bytes, options, launch_bound);
  launched.push_back(base_name(name));
  launched_full.push_back(name);
  const ThreadState saved = current;
  current.block_dim = block;
  current.grid_dim = grid;
  BlockRunner runner(name, block, shared_bytes, options, body);
  const size_t blocks = size_t(grid.x) * grid.y * grid.z;
  try {
    for (size_t id : visiting_order(blocks, options.schedule, runner.rng())) {
      runner.run_block(dim3(
          unsigned(id % grid.x), unsigned((id / grid.x) % grid.y), unsigned(id / (size_t(grid.x) * grid.y))));
    }
  } catch (...) {
    current = saved;
    throw;
  }
  current = saved;
}

void log_operation(const std::string& name) {
  launched.push_back(name);
  launched_full.push_back(name);
}

const std::vector<std::string>& launch_log() {
  return launched;
}

const std::vector<std::string>& full_launch_log() {
  return launched_full;
}

void clear_launch_log() {
  launched.clear();
  launched_full.clear();
}

}  // namespace simt
