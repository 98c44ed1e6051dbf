"""capsnet: fused dynamic routing between capsules for PyTorch.

The op: :func:`dynamic_routing` (fused C++/CUDA kernel with a pure-PyTorch reference,
:func:`dynamic_routing_reference`, of the same signature). The network of Sabour et al.
(2017) built on it: :class:`CapsNet` with its layers and losses.
"""

from capsnet._extension import build_info, has_kernel, has_ops
from capsnet.layers import DigitCaps, PrimaryCaps, ReconstructionDecoder
from capsnet.losses import capsnet_loss, margin_loss, reconstruction_loss
from capsnet.model import CapsNet, CapsNetConfig, CapsNetOutput
from capsnet.ops import dynamic_routing
from capsnet.reference import dynamic_routing_reference, squash

__all__ = [
    "CapsNet",
    "CapsNetConfig",
    "CapsNetOutput",
    "DigitCaps",
    "PrimaryCaps",
    "ReconstructionDecoder",
    "build_info",
    "capsnet_loss",
    "dynamic_routing",
    "dynamic_routing_reference",
    "has_kernel",
    "has_ops",
    "margin_loss",
    "reconstruction_loss",
    "squash",
]
__version__ = "0.1.0"
