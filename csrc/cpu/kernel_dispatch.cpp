// Run-time choice of the CPU kernel variant, and the op that reports it and the build
// (torch.ops.capsnet._build_info, read by capsnet.build_info()).
//
// setup.py compiles csrc/cpu/kernels/routing_kernels.cpp once per variant and defines
// CAPSNET_CPU_KERNEL_<NAME> here for each: BASELINE (x86-64-v2 on x86-64, the compiler's
// default elsewhere), AVX2 (x86-64-v3: AVX2, FMA, BMI2, F16C), AVX512 (x86-64-v4:
// AVX-512 F/BW/CD/DQ/VL), or only NATIVE (CAPSNET_CPU_ARCH=native: -march of the build
// machine, no run-time check).
#include "cpu/kernel_dispatch.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <sstream>

namespace capsnet {
namespace cpu {

#define CAPSNET_DECLARE_VARIANT(name) \
  namespace name {                    \
  const KernelVariant& kernel_variant(); \
  }
#ifdef CAPSNET_CPU_KERNEL_BASELINE
CAPSNET_DECLARE_VARIANT(baseline)
#endif
#ifdef CAPSNET_CPU_KERNEL_AVX2
CAPSNET_DECLARE_VARIANT(avx2)
#endif
#ifdef CAPSNET_CPU_KERNEL_AVX512
CAPSNET_DECLARE_VARIANT(avx512)
#endif
#ifdef CAPSNET_CPU_KERNEL_NATIVE
CAPSNET_DECLARE_VARIANT(native)
#endif
#undef CAPSNET_DECLARE_VARIANT

namespace {

constexpr const char* kEnvironmentVariable = "CAPSNET_CPU_KERNEL";

// What each variant needs from the CPU, checked with the compiler's cpuid helpers (which
// also check that the operating system saves the wider registers).
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
bool cpu_runs_x86_64_v2() { return __builtin_cpu_supports("x86-64-v2"); }
bool cpu_runs_x86_64_v3() { return __builtin_cpu_supports("x86-64-v3"); }
bool cpu_runs_x86_64_v4() { return __builtin_cpu_supports("x86-64-v4"); }
#else
bool cpu_runs_x86_64_v2() {
  return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("popcnt");
}
bool cpu_runs_x86_64_v3() {
  return cpu_runs_x86_64_v2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("movbe");
}
bool cpu_runs_x86_64_v4() {
  return cpu_runs_x86_64_v3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl");
}
#endif
[[maybe_unused]] constexpr const char* kBaselineNeeds = "x86-64-v2 (SSE4.2, SSSE3, POPCNT)";
#else
[[maybe_unused]] bool cpu_runs_x86_64_v2() { return true; }
[[maybe_unused]] bool cpu_runs_x86_64_v3() { return false; }
[[maybe_unused]] bool cpu_runs_x86_64_v4() { return false; }
[[maybe_unused]] constexpr const char* kBaselineNeeds = "the architecture's baseline";
#endif
[[maybe_unused]] bool always() { return true; }

struct VariantEntry {
  const char* name;
  bool (*cpu_runs_it)();
  const char* needs;  // what the CPU must support, in words
  const KernelVariant& (*kernels)();
};

// Lowest first; the best runnable one is the last runnable one.
const std::vector<VariantEntry>& built_variants() {
  static const std::vector<VariantEntry> variants = {
#ifdef CAPSNET_CPU_KERNEL_BASELINE
      {"baseline", &cpu_runs_x86_64_v2, kBaselineNeeds, &baseline::kernel_variant},
#endif
#ifdef CAPSNET_CPU_KERNEL_AVX2
      {"avx2", &cpu_runs_x86_64_v3, "x86-64-v3 (AVX2, FMA, BMI1/2, F16C, MOVBE)", &avx2::kernel_variant},
#endif
#ifdef CAPSNET_CPU_KERNEL_AVX512
      {"avx512", &cpu_runs_x86_64_v4, "x86-64-v4 (AVX-512 F, BW, CD, DQ, VL)", &avx512::kernel_variant},
#endif
#ifdef CAPSNET_CPU_KERNEL_NATIVE
      {"native", &always, "the build machine's instruction set (CAPSNET_CPU_ARCH=native)", &native::kernel_variant},
#endif
  };
  return variants;
}

std::string joined(const std::vector<std::string>& names) {
  std::ostringstream out;
  for (size_t k = 0; k < names.size(); ++k) {
    out << (k > 0 ? ", " : "") << names[k];
  }
  return out.str();
}

KernelChoice choose() {
  const std::vector<VariantEntry>& variants = built_variants();
  const char* requested_env = std::getenv(kEnvironmentVariable);
  const std::string requested = requested_env != nullptr ? requested_env : "";
  if (variants.empty()) {
    return {nullptr, "", "capsnet._C was built without CPU kernels"};
  }
  if (requested.empty() || requested == "auto") {
    for (auto it = variants.rbegin(); it != variants.rend(); ++it) {
      if (it->cpu_runs_it()) {
        return {&it->kernels(), std::string("the best variant built that this CPU runs (needs ") + it->needs + ")", ""};
      }
    }
    return {nullptr, "",
            std::string("this CPU runs none of the CPU kernel variants built (") + joined(built_kernel_variants()) +
                "); the lowest needs " + variants.front().needs};
  }
  for (const VariantEntry& entry : variants) {
    if (requested != entry.name) {
      continue;
    }
    if (!entry.cpu_runs_it()) {
      return {nullptr, "",
              std::string(kEnvironmentVariable) + "=" + requested + " asks for a variant that needs " + entry.needs +
                  ", which this CPU lacks; it runs: " + joined(supported_kernel_variants())};
    }
    return {&entry.kernels(), std::string(kEnvironmentVariable) + "=" + requested, ""};
  }
  return {nullptr, "",
          std::string(kEnvironmentVariable) + "=" + requested + " is not a CPU kernel variant of this build; built: " +
              joined(built_kernel_variants()) + " (or unset it, or 'auto', for the best this CPU runs)"};
}

// ["key=value", ...] (parsed by capsnet/_extension.py): the CPU kernel variants built and
// supported, the one chosen, why, or why none; the CUDA architectures of the build.
std::vector<std::string> build_info() {
  const KernelChoice& choice = kernel_choice();
  return {
      "cpu_kernels_built=" + joined(built_kernel_variants()),
      "cpu_kernels_supported=" + joined(supported_kernel_variants()),
      std::string("cpu_kernel=") + (choice.variant != nullptr ? choice.variant->name : ""),
      "cpu_kernel_reason=" + choice.reason,
      "cpu_kernel_error=" + choice.error,
#ifdef CAPSNET_CUDA_ARCH_LIST
      std::string("cuda_arch_list=") + CAPSNET_CUDA_ARCH_LIST,
#endif
  };
}

}  // namespace

const KernelChoice& kernel_choice() {
  static const KernelChoice choice = choose();
  return choice;
}

const KernelVariant& chosen_kernel_variant() {
  const KernelChoice& choice = kernel_choice();
  TORCH_CHECK(choice.variant != nullptr, "capsnet: no CPU kernel can run: ", choice.error);
  return *choice.variant;
}

std::vector<std::string> built_kernel_variants() {
  std::vector<std::string> names;
  for (const VariantEntry& entry : built_variants()) {
    names.emplace_back(entry.name);
  }
  return names;
}

std::vector<std::string> supported_kernel_variants() {
  std::vector<std::string> names;
  for (const VariantEntry& entry : built_variants()) {
    if (entry.cpu_runs_it()) {
      names.emplace_back(entry.name);
    }
  }
  return names;
}

TORCH_LIBRARY_FRAGMENT(capsnet, m) {
  // How the extension was built and which CPU kernel variant runs; for capsnet.build_info().
  m.def("_build_info() -> str[]", &build_info);
}

}  // namespace cpu
}  // namespace capsnet
