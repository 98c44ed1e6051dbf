// The forward kernels for double, in a translation unit of their own (routing_instances.h).
#include "routing_instances.h"

namespace capsnet::cuda {
CAPSNET_FORWARD_LAUNCHES(template, double)
}  // namespace capsnet::cuda
