"""Where the tests find real MNIST (``$CAPSNET_DATA_DIR`` or ``<repo>/../shared/data``), and
small MNIST-format files for tests that damage them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from capsnet.datasets import DATA_DIR_ENV
from capsnet.datasets.idx import idx_bytes
from capsnet.datasets.mnist import SPLIT_FILES

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


def write_small_mnist(root: Path, num_train: int = 40, num_test: int = 20, seed: int = 0) -> Path:
    """Valid MNIST-format IDX files with random 28x28 images under ``root/MNIST/raw``."""
    generator = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        images_name, labels_name = SPLIT_FILES[split]
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        (raw / images_name).write_bytes(idx_bytes(images))
        (raw / labels_name).write_bytes(idx_bytes(labels))
    return raw
