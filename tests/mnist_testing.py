"""Where the tests find real MNIST: ``$CAPSNET_DATA_DIR`` or ``<repo>/../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsnet.data import DATA_DIR_ENV

REPO = Path(__file__).resolve().parent.parent
RAW_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


def mnist_root() -> Path:
    """The data root (never downloads); fails the test, saying where it looked, if absent."""
    root = Path(os.environ.get(DATA_DIR_ENV) or REPO.parent / "shared" / "data")
    if not all((root / "MNIST" / "raw" / name).is_file() for name in RAW_FILES):
        pytest.fail(
            f"MNIST not found under {root}/MNIST/raw: set {DATA_DIR_ENV} "
            "or put shared/ beside the repo"
        )
    return root
