// The instruction-set variant a kernel translation unit is compiled for.
//
// csrc/cpu/kernels/routing_kernels.cpp is compiled once per variant (setup.py), each time
// with its own -march flags and -DCAPSNET_CPU_VARIANT=<name>; every kernel header puts its
// code into the namespace capsnet::cpu::<name>, so that the variants' functions never
// share a symbol: of an inline function or template emitted by several objects the linker
// keeps one copy for the whole library, possibly the one compiled for AVX-512. For the same
// reason the kernels instantiate no library templates (std::vector, std::fill_n, ...) and
// include no ATen headers (whose <iostream> brings a static initialiser, code that would run
// at import); setup.py checks every variant object for both (check_kernel_object).
#pragma once

#include <c10/macros/Macros.h>

#ifndef CAPSNET_CPU_VARIANT
#error "csrc/cpu/kernels/ is compiled through routing_kernels.cpp with -DCAPSNET_CPU_VARIANT=<name> (see setup.py)"
#endif
#ifndef CAPSNET_ROUTING_MATH_WITHOUT_ATEN
#error "the kernel variants are compiled without ATen's headers: define CAPSNET_ROUTING_MATH_WITHOUT_ATEN first"
#endif
