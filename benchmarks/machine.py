"""The context every benchmark result is recorded with: which machine, which kernel, how fast.

A time or a ratio means something only next to the machine it was measured on: the CPU model
and its vector extensions, the capsnet CPU kernel variant chosen at run time, the thread
count, and the rate of a large float32 ``torch.mm`` measured in the same run (the yardstick
for the FLOP floor of the fused forward).
"""

from __future__ import annotations

import datetime
import os
import platform
import re

import torch
import torch.utils.benchmark as torch_benchmark

import capsnet

# The vector extensions that decide kernel speed, as /proc/cpuinfo names them (x86 "flags",
# aarch64 "Features"); the results list those the CPU has, in this order.
VECTOR_EXTENSIONS = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16",
    "asimd", "asimdhp", "sve", "sve2",
)
# The widest extension present names the results file ("cpu-amd-epyc-2-cores-avx512f").
ISA_LEVELS = ("avx512f", "avx2", "avx", "sse4_2", "sve2", "sve", "asimd")

BUILD_INFO_UNAVAILABLE = "unknown (build_info unavailable)"
# Where capsnet.build_info() may name the CPU kernel variant it chose at load time.
CHOSEN_VARIANT_KEYS = ("cpu_kernel", "cpu_kernel_variant", "cpu_variant", "chosen_cpu_kernel")

MM_SIZE = 2048


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(fields: dict[str, str] | None = None) -> str:
    fields = _cpuinfo_fields() if fields is None else fields
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:  # x86: tells CPU generations with one brand name apart
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    elif "CPU part" in fields:  # aarch64
        name += f" (implementer {fields.get('CPU implementer', '?')}, part {fields['CPU part']})"
    return name


def vector_extensions(fields: dict[str, str] | None = None) -> list[str]:
    fields = _cpuinfo_fields() if fields is None else fields
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return [name for name in VECTOR_EXTENSIONS if name in flags]


def isa_level(extensions: list[str]) -> str:
    return next((name for name in ISA_LEVELS if name in extensions), platform.machine())


def build_info() -> dict | None:
    """capsnet.build_info() where this capsnet has it, else None."""
    function = getattr(capsnet, "build_info", None)
    return function() if callable(function) else None


def _find_chosen_variant(info) -> str | None:
    if not isinstance(info, dict):
        return None
    for key in CHOSEN_VARIANT_KEYS:
        if isinstance(info.get(key), str):
            return info[key]
    for key, value in info.items():
        if isinstance(value, str) and any(word in key.lower() for word in ("chosen", "selected")):
            return value
        found = _find_chosen_variant(value)
        if found is not None:
            return found
    return None


def cpu_kernel_variant(info: dict | None) -> str:
    if info is None:
        return BUILD_INFO_UNAVAILABLE
    return _find_chosen_variant(info) or "unknown (capsnet.build_info() names no chosen CPU variant)"


def torch_mm_gflops(device: str = "cpu", size: int = MM_SIZE, min_run_time: float = 1.0) -> float:
    """GFLOP/s of a [size, size] x [size, size] float32 torch.mm on this device, in this process."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    torch.mm(a, b)  # warm-up: thread pool, BLAS kernel selection
    timer = torch_benchmark.Timer(  # synchronises CUDA around each measurement
        stmt="torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}, num_threads=torch.get_num_threads()
    )
    seconds = timer.blocked_autorange(min_run_time=min_run_time).median
    return 2 * size**3 / seconds / 1e9


def machine_context(device: str = "cpu", mm_gflops: float | None = None) -> dict:
    """Everything a results file records about where and with what it was measured."""
    fields = _cpuinfo_fields()
    extensions = vector_extensions(fields)
    info = build_info()
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model(fields),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "vector_extensions": extensions,
        "isa_level": isa_level(extensions),
        "cpu_kernel_variant": cpu_kernel_variant(info),
        "build_info": info if info is not None else BUILD_INFO_UNAVAILABLE,
        "threads": torch.get_num_threads(),
        # Other processes share the cores on many machines (CI, VMs): a load above the core
        # count when the run starts says that its times are inflated and noisy.
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "capsnet": capsnet.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    }
    if mm_gflops is not None:
        context["torch_mm_gflops"] = round(mm_gflops, 1)
        context["torch_mm"] = f"{MM_SIZE}x{MM_SIZE} @ {MM_SIZE}x{MM_SIZE}, float32, {device}"
    return context


def results_name(context: dict) -> str:
    """A file name for one machine: device, CPU model, cores and widest vector extension."""
    model = re.sub(r"\(.*\)", "", context["cpu_model"])
    parts = [context["device"], model, f"{context['cpu_cores']}-cores", context["isa_level"]]
    if context["device"] == "cuda":
        parts.insert(1, context["device_name"])
    return re.sub(r"[^A-Za-z0-9]+", "-", " ".join(parts)).strip("-").lower()


def describe(context: dict) -> list[str]:
    """The context as Markdown lines for a results file or a terminal."""
    lines = [
        f"- host: {context['cpu_model']}, {context['cpu_cores']} cores available, "
        f"{context['threads']} torch threads"
        + (f"; GPU: {context['device_name']}" if context["device"] == "cuda" else ""),
        f"- vector extensions: {', '.join(context['vector_extensions']) or 'none found in /proc/cpuinfo'}",
        f"- capsnet CPU kernel variant: {context['cpu_kernel_variant']}",
        f"- capsnet {context['capsnet']}, torch {context['torch']} (CUDA {context['torch_cuda']}), "
        f"python {context['python']}; measured {context['date']}",
    ]
    if context.get("load_average_1_5_15_min"):
        load = ", ".join(f"{x:.2f}" for x in context["load_average_1_5_15_min"])
        lines.append(f"- load average (1, 5, 15 min) at the start: {load}, on {context['cpu_cores']} cores")
    if "torch_mm_gflops" in context:
        lines.append(f"- torch.mm rate: {context['torch_mm_gflops']:.1f} GFLOP/s ({context['torch_mm']}, same run)")
    return lines
