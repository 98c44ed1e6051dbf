// The backward kernels for c10::BFloat16, in a translation unit of their own (routing_instances.h).
#include "routing_instances.h"

namespace capsnet::cuda {
CAPSNET_BACKWARD_LAUNCHES(template, c10::BFloat16)
}  // namespace capsnet::cuda
