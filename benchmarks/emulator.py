"""Build and load the CPU emulation of the CUDA kernels (``csrc/simt``).

The module compiles the very kernels nvcc compiles (``csrc/cuda/routing_forward.cuh``,
``routing_backward.cuh``) and the CUDA launcher's host code (``csrc/cuda/routing_host.h``) with
g++ against ``csrc/simt/simt.h``. ``tests/test_cuda_emulated.py`` runs the kernels through it;
``benchmarks/cuda_model.py`` reads the launch plan and the launch order from it.

The build (about a minute, once; ninja rebuilds only what changed) goes to
``$CAPSNET_SIMT_BUILD_DIR`` or ``~/.cache/capsnet/simt``, never into the repository.
``CAPSNET_SIMT_SANITIZE=1`` builds it with AddressSanitizer and UndefinedBehaviorSanitizer
into a separate folder (``make test-cuda-asan``).
"""

from __future__ import annotations

import functools
import os
import pathlib

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
SOURCES = ["emulated_routing.cpp", "simt.cpp", "simt_selftest.cpp"]
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]


def sanitized() -> bool:
    return os.environ.get("CAPSNET_SIMT_SANITIZE") == "1"


def build_directory() -> str:
    root = os.environ.get("CAPSNET_SIMT_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "capsnet", "simt")
    flavour = "-asan" if sanitized() else ""
    path = os.path.join(root, f"torch-{torch.__version__}{flavour}")
    os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def load():
    """The compiled emulator module (built on first use)."""
    return build_module("capsnet_simt", [CSRC / "simt" / name for name in SOURCES])


def build_module(name: str, sources: list, include_paths: tuple = ()):
    """Compiles `sources` (with csrc/simt/simt.cpp, or a file that includes it, among them)
    against the emulator into module `name`, with the emulator's flags; sanitized (and
    named `name`_asan) under CAPSNET_SIMT_SANITIZE=1, in its own folder under
    build_directory()."""
    from torch.utils.cpp_extension import load as load_extension

    # C++20 for std::source_location; `#pragma unroll` means nothing to g++; no contraction
    # of a * b + c, so that emulated results do not depend on the host's FMA support.
    cflags = ["-O2", "-std=c++20", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    ldflags = []
    if sanitized():
        cflags += SANITIZER_FLAGS
        ldflags += ["-fsanitize=address,undefined"]
        name += "_asan"
    directory = os.path.join(build_directory(), name)
    os.makedirs(directory, exist_ok=True)
    return load_extension(
        name=name,
        sources=[str(source) for source in sources],
        extra_include_paths=[str(CSRC), str(CSRC / "simt"), *map(str, include_paths)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=directory,
    )
