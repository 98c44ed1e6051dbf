"""The build: the extension is loaded, and CUDA kernels are in it wherever they can be built."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import capsnet
from capsnet import _extension


def test_extension_is_loaded_with_cpu_kernels():
    assert capsnet.has_ops(), _extension.missing_reason("cpu", torch.float32)
    assert _extension.KERNEL_DEVICE_TYPES >= {"cpu"}


def _nvcc_available() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates.append(shutil.which("nvcc") or "")
    return next((c for c in candidates if c and os.path.exists(c)), None)


def test_cuda_kernels_built_when_nvcc_is_present():
    """CI fails here if nvcc and a CUDA build of torch exist but the CUDA kernels were not built."""
    nvcc = _nvcc_available()
    if os.environ.get("CAPSNET_FORCE_CUDA") == "0":
        pytest.skip("CUDA kernels not expected: CAPSNET_FORCE_CUDA=0")
    if torch.version.cuda is None:
        pytest.skip(f"CUDA kernels not expected: torch {torch.__version__} is a CPU-only build")
    if nvcc is None:
        pytest.skip("CUDA kernels not expected: nvcc not found (CUDA_HOME unset and not on PATH)")
    assert "cuda" in _extension.KERNEL_DEVICE_TYPES, (
        f"nvcc ({nvcc}) and torch {torch.__version__} (CUDA {torch.version.cuda}) are present, but "
        "capsnet._C has no CUDA kernel for capsnet::routing_forward: the CUDA sources were not built"
    )
