// The forward kernels for c10::Half, in a translation unit of their own (routing_instances.h).
#include "routing_instances.h"

namespace capsnet::cuda {
CAPSNET_FORWARD_LAUNCHES(template, c10::Half)
}  // namespace capsnet::cuda
