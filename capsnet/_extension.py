"""Loading the compiled extension ``capsnet._C``, asking which kernels it has, and
:func:`build_info`.

The package imports without the extension (the reference backend still works); asking
for the fused backend explicitly then fails with an error that says how to build it. The
same holds when the extension's CPU kernels cannot run on this CPU, or when
``CAPSNET_CPU_KERNEL`` asks for a variant it cannot run: the reason is in the error.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re

import torch

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `make install`); see README.md, 'Building'"
)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _load_extension() -> str | None:
    """Imports capsnet._C (which registers torch.ops.capsnet.*); None, or why it failed."""
    # Python words a missing module inside a package that is still importing as "cannot
    # import name '_C' from partially initialized module 'capsnet' (most likely due to a
    # circular import)", which sends the reader the wrong way: say plainly that it is not built.
    if importlib.util.find_spec("capsnet._C") is None:
        return f"it has not been built: no compiled module in {os.path.dirname(__file__)}"
    try:
        from capsnet import _C  # noqa: F401
    except ImportError as error:  # e.g. built against another torch: undefined symbols
        return str(error)
    return None


_LOAD_ERROR: str | None = _load_extension()


def _registered_device_types() -> frozenset[str]:
    if _LOAD_ERROR is not None:
        return frozenset()
    return frozenset(
        device_type
        for device_type, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key("capsnet::routing_forward", key)
        and torch._C._dispatch_has_kernel_for_dispatch_key("capsnet::routing_backward", key)
    )


def _read_build_info() -> dict[str, str]:
    """The extension's own report (csrc/cpu/kernel_dispatch.cpp): ``key=value`` strings."""
    if _LOAD_ERROR is None and hasattr(torch.ops.capsnet, "_build_info"):
        return dict(item.split("=", 1) for item in torch.ops.capsnet._build_info())
    return {}


def _names(joined: str) -> list[str]:
    return [name for name in joined.split(", ") if name]


# Read once at import (the kernels register when _C loads, and the CPU kernel variant is
# chosen on first use, here): the checks below are then pure Python, which torch.compile
# traces without a graph break.
_BUILD_INFO = _read_build_info()
CPU_KERNEL_ERROR: str | None = _BUILD_INFO.get("cpu_kernel_error") or None
KERNEL_DEVICE_TYPES = _registered_device_types() - ({"cpu"} if CPU_KERNEL_ERROR else set())


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
    if device_type == "cpu" and CPU_KERNEL_ERROR:
        return f"capsnet._C's CPU kernels cannot run: {CPU_KERNEL_ERROR}"
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
    """The TORCH_CUDA_ARCH_LIST entries capsnet._C was built with (compiled into it by
    setup.py, read through build info), e.g. ("7.5", "8.0", "9.0+PTX"); None when not known,
    or when an entry is not a number (torch also takes names such as "Hopper" and "native",
    which this module does not resolve: no claim is made then, and a launch on an uncovered
    GPU reports it)."""
    arch_list = _BUILD_INFO.get("cuda_arch_list")
    if not arch_list:
        return None
    entries = tuple(entry for entry in arch_list.replace(" ", ";").split(";") if entry)
    if any(_parse_arch(entry) is None for entry in entries):
        return None
    return entries


_ARCH_ENTRY = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?", re.IGNORECASE)


def _parse_arch(entry: str) -> tuple[int, int, str, bool] | None:
    """"9.0a+PTX" -> (9, 0, "a", True); None for anything else than major.minor, an optional
    "a" or "f" and an optional "+PTX"."""
    m = _ARCH_ENTRY.fullmatch(entry.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3).lower(), m.group(4) is not None


def arch_covers(capability: tuple[int, int], archs: tuple[str, ...]) -> bool:
    """Whether code built for `archs` runs on a GPU of compute `capability`. A cubin for
    sm_XY runs on X.Z for Z >= Y (sm_80 code on sm_86 and sm_89), and so does a
    family-specific one (sm_XYf); an arch-specific one (sm_XYa, e.g. 9.0a, with Hopper-only
    instructions) runs on X.Y alone, its PTX too. Other PTX for X.Y is compiled by the
    driver for any X.Y or newer. Entries that are not numbers cover nothing."""
    for entry in archs:
        parsed = _parse_arch(entry)
        if parsed is None:
            continue
        built_major, built_minor, variant, ptx = parsed
        if variant == "a":
            if (built_major, built_minor) == capability:
                return True
            continue
        if built_major == capability[0] and built_minor <= capability[1]:
            return True
        if ptx and (built_major, built_minor) <= capability:
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


# CPU flags that matter for the kernels (x86 names from /proc/cpuinfo "flags", Arm ones from
# "Features").
_RELEVANT_CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni",
    "amx_tile", "asimd", "sve", "sve2",
)


def _cpu_description() -> tuple[str, list[str]]:
    """(model name, relevant flags) from /proc/cpuinfo where there is one."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return model, [flag for flag in _RELEVANT_CPU_FLAGS if flag in (flags or ())]


def build_info() -> dict:
    """How capsnet was built and which kernels run here, for benchmark headers and bug reports.

    Keys (stable; add, do not rename):
        ``version``: capsnet's version. ``torch``: torch's version.
        ``extension_loaded``: whether ``capsnet._C`` loaded; ``extension_error``: why not, or None.
        ``cpu_kernels_built``: the CPU kernel variants in the build, lowest first (``baseline``
        = x86-64-v2, ``avx2`` = x86-64-v3, ``avx512`` = x86-64-v4; or only ``native`` when built
        with ``CAPSNET_CPU_ARCH=native``).
        ``cpu_kernels_supported``: those this CPU can run.
        ``cpu_kernel``: the variant the fused CPU op runs, or None when none can run.
        ``cpu_kernel_reason``: why that one (best supported, or ``CAPSNET_CPU_KERNEL=...``), or
        why none.
        ``cpu_model``: the CPU's model name. ``cpu_flags``: its vector extensions that matter
        here (e.g. ``avx2``, ``fma``, ``avx512f``), from /proc/cpuinfo.
        ``torch_cpu_capability``: the CPU kernels ATen itself chose (e.g. ``AVX512``).
        ``threads``: ``torch.get_num_threads()``.
        ``cuda_built``: whether the extension has CUDA kernels. ``cuda_arch_list``: the
        TORCH_CUDA_ARCH_LIST it was built for (None when unknown or not built).
        ``torch_cuda``: ``torch.version.cuda``.
    """
    from capsnet import __version__

    model, flags = _cpu_description()
    loaded = has_ops()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "extension_loaded": loaded,
        "extension_error": _LOAD_ERROR,
        "cpu_kernels_built": _names(_BUILD_INFO.get("cpu_kernels_built", "")),
        "cpu_kernels_supported": _names(_BUILD_INFO.get("cpu_kernels_supported", "")),
        "cpu_kernel": _BUILD_INFO.get("cpu_kernel") or None,
        "cpu_kernel_reason": (CPU_KERNEL_ERROR or _BUILD_INFO.get("cpu_kernel_reason"))
        if loaded
        else f"capsnet._C not loaded: {_LOAD_ERROR}",
        "cpu_model": model,
        "cpu_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda_built": "cuda" in _registered_device_types(),
        "cuda_arch_list": _BUILD_INFO.get("cuda_arch_list"),
        "torch_cuda": torch.version.cuda,
    }
