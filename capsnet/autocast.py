"""The autocast policy of the routing op: under ``torch.autocast`` it runs in float32.

One policy, for CPU and CUDA, for both backends. In an autocast region (float16 or bfloat16)
the routing softmax, the long sums over input capsules and the squash are where reduced
precision hurts, so the op's floating-point inputs (u, W, bias, logit_prior) are cast to
float32, as autocast does for softmax, norms and losses; float64 inputs stay float64. The
routing then loses nothing beyond the half-precision rounding of its inputs and returns
float32 ``v``; gradients flow back through the casts, in the inputs' own dtypes.

Outside autocast nothing is cast: float16 and bfloat16 inputs run natively (the fused kernels
accumulate in float32 and return the input dtype; the reference computes in the input dtype).

Two places apply it:

* :func:`capsnet.dynamic_routing` casts with :func:`cast_for_routing` and runs either backend
  with autocast off (the reference's einsum would otherwise run in half precision);
* for direct calls of ``torch.ops.capsnet.routing_forward``, importing this module registers
  the same cast as the op's Autocast kernel on CPU and CUDA (the dispatcher runs it before
  autograd, so the casts are recorded).

Checks and kernel choice must use :func:`dtype_seen_by_op`, the dtype after the policy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from capsnet import _extension

# The device types with an autocast mode (torch.autocast("cpu") and torch.autocast("cuda")).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
AUTOCAST_DTYPE = torch.float32
_CAST_DTYPES = (torch.float16, torch.bfloat16)


def autocast_active(device_type: str) -> bool:
    """True inside an autocast region for ``device_type`` (never for other device types)."""
    return device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def dtype_seen_by_op(tensor: Tensor) -> torch.dtype:
    """The dtype ``tensor`` has when the routing receives it: float32 for a float16 or
    bfloat16 tensor while autocast is on for its device type, otherwise its own dtype."""
    if tensor.dtype in _CAST_DTYPES and autocast_active(tensor.device.type):
        return AUTOCAST_DTYPE
    return tensor.dtype


def cast_for_routing(tensor: Tensor | None) -> Tensor | None:
    """``tensor`` in the dtype the policy gives it (a differentiable cast, or itself)."""
    if tensor is None or dtype_seen_by_op(tensor) == tensor.dtype:
        return tensor
    return tensor.to(AUTOCAST_DTYPE)


def routing_precision(device_type: str):
    """Context in which the routing runs: autocast off for ``device_type`` when it was on
    (the inputs were cast by :func:`cast_for_routing`), else nothing."""
    if autocast_active(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


if _extension.has_ops():
    for _device_type in AUTOCAST_DEVICE_TYPES:
        torch.library.register_autocast("capsnet::routing_forward", _device_type, AUTOCAST_DTYPE)
