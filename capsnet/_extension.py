"""Loading the compiled extension ``capsnet._C`` and asking which kernels it has.

The package imports without the extension (the reference backend still works); asking
for the fused backend explicitly then fails with an error that says how to build it.
"""

from __future__ import annotations

import torch

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `make install`); see README.md, 'Building'"
)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

try:
    from capsnet import _C  # noqa: F401  (loading it registers torch.ops.capsnet.*)

    _LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    _LOAD_ERROR = str(error)


def _registered_device_types() -> frozenset[str]:
    if _LOAD_ERROR is not None:
        return frozenset()
    return frozenset(
        device_type
        for device_type, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key("capsnet::routing_forward", key)
        and torch._C._dispatch_has_kernel_for_dispatch_key("capsnet::routing_backward", key)
    )


# Read once at import (the kernels register when _C loads): the checks below are then pure
# Python, which torch.compile traces without a graph break.
KERNEL_DEVICE_TYPES = _registered_device_types()


def has_ops() -> bool:
    """True when the compiled library is loaded and defines the capsnet ops."""
    return _LOAD_ERROR is None


def _has_device_kernel(device_type: str) -> bool:
    return device_type in KERNEL_DEVICE_TYPES


def has_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """True when the fused op can run on this device type and dtype."""
    return dtype in FUSED_DTYPES and _has_device_kernel(device_type)


def missing_reason(device_type: str, dtype: torch.dtype) -> str:
    """Why ``has_kernel(device_type, dtype)`` is False, in words."""
    if not has_ops():
        return f"the compiled extension capsnet._C could not be loaded ({_LOAD_ERROR}); {BUILD_HINT}"
    if not _has_device_kernel(device_type):
        hint = (
            "the extension was built without CUDA: rebuild where torch.version.cuda is set and "
            "nvcc is found, or with CAPSNET_FORCE_CUDA=1"
            if device_type == "cuda"
            else "only CPU and CUDA kernels exist"
        )
        return f"capsnet._C has no kernel for device '{device_type}' ({hint})"
    return f"the fused kernels support {[str(d) for d in FUSED_DTYPES]}, got {dtype}"


def require_kernel(device_type: str, dtype: torch.dtype) -> None:
    """Raise a RuntimeError explaining what is missing when the fused op cannot run."""
    if not has_kernel(device_type, dtype):
        raise RuntimeError(f"capsnet: backend='fused' is unavailable: {missing_reason(device_type, dtype)}")
