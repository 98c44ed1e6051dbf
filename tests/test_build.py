"""The build: the extension is loaded from the package, CUDA kernels are in it wherever they
can be built, and a build without torch stops at once with instructions."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import capsnet
from capsnet import _extension


def test_extension_is_loaded_with_cpu_kernels():
    assert capsnet.has_ops(), _extension.missing_reason("cpu", torch.float32)
    assert _extension.KERNEL_DEVICE_TYPES >= {"cpu"}


REPO = pathlib.Path(__file__).resolve().parents[1]


def test_extension_is_part_of_the_package():
    """capsnet._C sits in the capsnet package folder, where wheels and installs put it."""
    from capsnet import _C

    assert pathlib.Path(_C.__file__).resolve().parent == pathlib.Path(capsnet.__file__).resolve().parent


def test_build_without_torch_stops_with_instructions():
    """What pip's isolated build environment sees (no torch): setup.py exits before doing
    anything else, saying to install torch and build with --no-build-isolation."""
    hide_torch_and_run_setup = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_torch_and_run_setup], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, f"setup.py went on without torch:\n{result.stdout}"
    message = result.stderr
    assert message.startswith("capsnet: cannot build: torch is not importable"), message[-2000:]
    assert "pip install torch" in message and "pip install --no-build-isolation ." in message, message
    assert result.stdout == "", f"setup.py did work before checking for torch:\n{result.stdout}"


def test_unbuilt_package_says_the_extension_is_not_built(tmp_path):
    """A source checkout that was never built (no capsnet/_C*.so): the package still imports
    (the reference backend works) and the reason names the missing build, not the "circular
    import" that Python's own message suggests."""
    shutil.copytree(REPO / "capsnet", tmp_path / "capsnet", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    show_reason = (
        # An editable install's import hook would find the real capsnet/_C*.so for the copy.
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
        "getattr(f, '__module__', '').startswith('__editable__')]; "
        "import capsnet, torch; from capsnet import _extension as e; print(e._LOAD_ERROR); "
        "u = torch.randn(2, 3, 4); W = torch.randn(3, 2, 5, 4); "
        "print(capsnet.dynamic_routing(u, W, None, 3, backend='reference').shape)"
    )
    result = subprocess.run(
        [sys.executable, "-c", show_reason], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reason, shape = result.stdout.splitlines()[-2:]
    assert reason == f"it has not been built: no compiled module in {tmp_path / 'capsnet'}", reason
    assert "circular" not in result.stdout + result.stderr
    assert shape == "torch.Size([2, 2, 5])"


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
