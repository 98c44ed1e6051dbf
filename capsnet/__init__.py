"""capsnet: fused dynamic routing between capsules for PyTorch.

The op: :func:`dynamic_routing` (fused C++/CUDA kernel with a pure-PyTorch reference,
:func:`dynamic_routing_reference`, of the same signature).
"""

from capsnet._extension import has_kernel, has_ops
from capsnet.ops import dynamic_routing
from capsnet.reference import dynamic_routing_reference, squash

__all__ = [
    "dynamic_routing",
    "dynamic_routing_reference",
    "has_kernel",
    "has_ops",
    "squash",
]
__version__ = "0.1.0"
