"""Automatic mixed precision (``--amp``): which reduced dtype, autocast and loss scaling.

bfloat16 has float32's exponent range, so it needs no loss scaling; it is used on CPUs and
on GPUs that support it (Ampere and newer). Older GPUs get float16 with a GradScaler.
The routing op always runs in float32 under autocast (see :mod:`capsnet.autocast`).
"""

from __future__ import annotations

import contextlib

import torch


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """``torch.autocast`` for ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for float16 autocast (a pass-through otherwise)."""
    needs_scaling = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=needs_scaling)
