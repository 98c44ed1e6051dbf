// The backward kernels for c10::Half, in a translation unit of their own (routing_instances.h).
#include "routing_instances.h"

namespace capsnet::cuda {
CAPSNET_BACKWARD_LAUNCHES(template, c10::Half)
}  // namespace capsnet::cuda
