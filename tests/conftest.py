"""Shared pytest set-up: the ``needs_cuda`` marker and the ``device`` parametrisation.

Tests marked ``needs_cuda`` are skipped, with the reason printed, when no GPU is visible;
collection never touches the GPU (``torch.cuda.is_available`` only asks the driver).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

CUDA_SKIP_REASON = "needs_cuda: no CUDA GPU visible (torch.cuda.is_available() is False)"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: runs only where a CUDA GPU is available")
    # Generated data sets are cached (capsnet.datasets.cache): the tests, and the training
    # runs they start, use a cache of their own, never the user's.
    if "CAPSNET_CACHE_DIR" not in os.environ:
        config._capsnet_test_cache = tempfile.mkdtemp(prefix="capsnet-test-cache-")
        os.environ["CAPSNET_CACHE_DIR"] = config._capsnet_test_cache


def pytest_unconfigure(config):
    test_cache = getattr(config, "_capsnet_test_cache", None)
    if test_cache is not None:
        shutil.rmtree(test_cache, ignore_errors=True)
        os.environ.pop("CAPSNET_CACHE_DIR", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip_cuda)


def pytest_report_header(config):
    import capsnet

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # The training tests write checkpoints of about 100 MB (400 MB for the CNN baseline); a
    # full disk shows up as unrelated-looking write errors, so say how much room there is.
    scratch = tempfile.gettempdir()
    return [
        f"capsnet: torch {torch.__version__} (CUDA {torch.version.cuda}), {cuda}; "
        f"extension loaded: {capsnet.has_ops()}, CPU kernel: {capsnet.has_kernel('cpu', torch.float32)}, "
        f"CUDA kernel: {capsnet.has_kernel('cuda', torch.float32)}",
        f"free disk in {scratch}: {shutil.disk_usage(scratch).free / 2**30:.1f} GiB",
    ]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
