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


# ---------------------------------------------------------------------------------------
# Which GPUs the CUDA kernels were compiled for.
# ---------------------------------------------------------------------------------------
REBUILD_FOR_DEVICE_HINT = (
    'rebuild for it from the repository root with TORCH_CUDA_ARCH_LIST="{arch}" '
    "pip install --no-build-isolation --no-deps -e . (an arch list with '+PTX' also covers newer GPUs)"
)


def compiled_cuda_archs() -> tuple[str, ...] | None:
    """The TORCH_CUDA_ARCH_LIST entries capsnet._C was built with (setup.py records them in
    capsnet/_cuda_build.py), e.g. ("7.5", "8.0", "9.0+PTX"); None when not known."""
    try:
        from capsnet._cuda_build import CUDA_ARCH_LIST
    except ImportError:
        return None
    return tuple(CUDA_ARCH_LIST)


def arch_covers(capability: tuple[int, int], archs: tuple[str, ...]) -> bool:
    """Whether code built for `archs` runs on a GPU of compute `capability`: a cubin for
    sm_XY runs on X.Z for Z >= Y (sm_80 code on sm_86 and sm_89), and PTX for X.Y is
    compiled by the driver for any X.Y or newer."""
    major, minor = capability
    for entry in archs:
        number, _, suffix = entry.strip().partition("+")
        built_major, built_minor = (int(part) for part in number.split(".")[:2])
        if built_major == major and built_minor <= minor:
            return True
        if suffix.upper() == "PTX" and (built_major, built_minor) <= (major, minor):
            return True
    return False


def arch_problem(device_name: str, capability: tuple[int, int], archs: tuple[str, ...] | None) -> str | None:
    """Why the CUDA kernels cannot run on this GPU, or None when they can (or when the
    extension does not say what it was built for)."""
    if archs is None or arch_covers(capability, archs):
        return None
    arch = f"{capability[0]}.{capability[1]}"
    return (
        f"the GPU '{device_name}' (compute capability {arch}) is not covered by the CUDA architectures "
        f"capsnet._C was built for ({';'.join(archs)}); " + REBUILD_FOR_DEVICE_HINT.format(arch=arch)
    )


_cuda_device_problems: dict[int, str | None] = {}


def cuda_device_problem(device: torch.device) -> str | None:
    """arch_problem for the GPU of `device`, asked once per GPU (None while torch.compile
    traces: the eager call or the launch reports it)."""
    if torch.compiler.is_compiling():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_device_problems:
        _cuda_device_problems[index] = arch_problem(
            torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), compiled_cuda_archs()
        )
    return _cuda_device_problems[index]


def require_kernel(device_type: str, dtype: torch.dtype) -> None:
    """Raise a RuntimeError explaining what is missing when the fused op cannot run."""
    if not has_kernel(device_type, dtype):
        raise RuntimeError(f"capsnet: backend='fused' is unavailable: {missing_reason(device_type, dtype)}")
