// The forward kernels for float, in a translation unit of their own (routing_instances.h).
#include "routing_instances.h"

namespace capsnet::cuda {
CAPSNET_FORWARD_LAUNCHES(template, float)
}  // namespace capsnet::cuda
