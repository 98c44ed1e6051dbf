// The backward kernels for double, in a translation unit of their own (routing_instances.h).
#include "routing_instances.h"

namespace capsnet::cuda {
CAPSNET_BACKWARD_LAUNCHES(template, double)
}  // namespace capsnet::cuda
