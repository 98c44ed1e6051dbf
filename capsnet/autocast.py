"""Autocast rule for the fused routing op: under ``torch.autocast`` it runs in float32.

The fused kernels take float32 or float64. In an autocast region (float16 or bfloat16) the
dispatcher first calls the op's Autocast kernel; the one registered here casts the
floating-point inputs (u, W, bias) to float32 and runs the op with autocast off, as autocast
does for other ops that need range or precision (softmax, norms, losses). The routing then
accumulates in float32, so it loses nothing beyond the half-precision rounding of its
inputs, and returns float32 ``v``; gradients flow back through the casts, in the inputs'
own dtypes.

Importing this module registers the rule (once; ``capsnet.ops`` imports it). Without the
compiled extension there is no op and nothing to register.
"""

from __future__ import annotations

import torch

from capsnet import _extension

# Device types whose autocast casts the op's inputs to float32. CUDA is where autocast is
# used for training; add "cpu" to cover torch.autocast("cpu", dtype=torch.bfloat16) too.
AUTOCAST_DEVICE_TYPES = ("cuda",)
AUTOCAST_DTYPE = torch.float32


def dtype_seen_by_op(tensor: torch.Tensor) -> torch.dtype:
    """The dtype ``tensor`` has when the op receives it: float32 for a float16 or bfloat16
    tensor while autocast is on for its device type (the rule below casts it), otherwise its
    own dtype (autocast leaves float32 and float64 alone). Check dtypes and pick the kernel
    with this, not with ``tensor.dtype``."""
    device_type = tensor.device.type
    if (
        tensor.dtype in (torch.float16, torch.bfloat16)
        and device_type in AUTOCAST_DEVICE_TYPES
        and torch.is_autocast_enabled(device_type)
    ):
        return AUTOCAST_DTYPE
    return tensor.dtype


if _extension.has_ops():
    for _device_type in AUTOCAST_DEVICE_TYPES:
        torch.library.register_autocast("capsnet::routing_forward", _device_type, AUTOCAST_DTYPE)
