// Choosing the CPU kernel variant (instruction set) at run time, the way ATen chooses its
// CPU_CAPABILITY kernels: every variant setup.py built is compiled for one instruction
// set (csrc/cpu/kernels/), and the first call picks the best one this CPU can run, or the
// one the environment variable CAPSNET_CPU_KERNEL names. Nothing of a variant runs before
// that check.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernel_interface.h"

namespace capsnet {
namespace cpu {

// Which variant runs in this process and why, decided once on first use.
struct KernelChoice {
  const KernelVariant* variant;  // null when none can run (see error)
  std::string reason;            // why this one
  std::string error;             // why none, when variant is null
};

const KernelChoice& kernel_choice();

// The chosen variant; a clear error (TORCH_CHECK) when there is none.
const KernelVariant& chosen_kernel_variant();

// Names of the variants in this build, and of those this CPU can run, lowest first.
std::vector<std::string> built_kernel_variants();
std::vector<std::string> supported_kernel_variants();

}  // namespace cpu
}  // namespace capsnet
