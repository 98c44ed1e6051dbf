"""MNIST from its four IDX files, checked on reading, as an :class:`ImageSet` on a device.

The files are read directly (``capsnet.datasets.idx``), so a damaged file is reported
naming the file and the problem; torchvision is needed only to download them
(``download=True``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from capsnet.datasets.augmentation import ShiftedImages
from capsnet.datasets.idx import IdxFormatError, read_idx_uint8
from capsnet.datasets.image_set import ImageSet

DATA_DIR_ENV = "CAPSNET_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_FILES = tuple(name for pair in SPLIT_FILES.values() for name in pair)


class DatasetError(ValueError):
    """A data set cannot be used (the message says which file and why)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The MNIST files are not where we looked (the message says where and how to supply them)."""


class DatasetFormatError(DatasetError):
    """An MNIST file exists but is damaged or not an MNIST file."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The MNIST root: ``data_dir`` if given, else ``$CAPSNET_DATA_DIR``, else ``./data``.

    The root is the directory that holds ``MNIST/raw`` (torchvision's layout).
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def raw_dir(root: str | os.PathLike) -> Path:
    return Path(root).expanduser() / "MNIST" / "raw"


def load_mnist(
    root: str | os.PathLike,
    train: bool,
    device: str | torch.device = "cpu",
    download: bool = False,
) -> ImageSet:
    """MNIST's training (``train=True``, 60,000 images) or test split (10,000) as uint8
    ``[N, 1, 28, 28]`` images and int64 labels on ``device``.

    Reads ``root/MNIST/raw``; downloads there (with torchvision) only when ``download`` is
    True and files are missing.

    Raises:
        DatasetNotFoundError: naming the directory searched and the ways to supply the data.
        DatasetFormatError: naming the damaged file and what was expected.
    """
    root = Path(root).expanduser()
    images_name, labels_name = SPLIT_FILES["train" if train else "test"]
    directory = raw_dir(root)
    if download and not all((directory / name).is_file() for name in MNIST_FILES):
        _download(root)
    _require_files(root, (images_name, labels_name))
    try:
        images = read_idx_uint8(directory / images_name, num_dims=3)
        labels = read_idx_uint8(directory / labels_name, num_dims=1)
    except IdxFormatError as error:
        raise DatasetFormatError(f"MNIST file damaged: {error}") from None
    _check_split(directory / images_name, images, directory / labels_name, labels)
    return ImageSet(images.unsqueeze(1).to(device), labels.to(torch.long).to(device))


def _check_split(images_path: Path, images, labels_path: Path, labels) -> None:
    if tuple(images.shape[1:]) != IMAGE_SHAPE[1:]:
        raise DatasetFormatError(
            f"{images_path} holds {'x'.join(map(str, images.shape[1:]))} images, "
            f"expected MNIST's 28x28"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; they must match"
        )
    if images.shape[0] == 0:
        raise DatasetFormatError(f"{images_path} holds no images")
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        bad = int((labels >= NUM_CLASSES).nonzero()[0, 0])
        raise DatasetFormatError(
            f"{labels_path} has label {int(labels[bad])} at index {bad}; MNIST labels are "
            f"0 to {NUM_CLASSES - 1}"
        )


def _require_files(root: Path, names: tuple[str, ...]) -> None:
    directory = raw_dir(root)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"MNIST not found: looked in {directory.resolve()} (data directory {root}) and "
            f"found no {', '.join(missing)}. Supply it with --data-dir DIR "
            f"(the directory that contains MNIST/raw; e.g. ../shared/data), the {DATA_DIR_ENV} "
            "environment variable, or --download to fetch it (download=True from Python)."
        )


def _download(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST
    except ImportError as error:
        raise DatasetNotFoundError(
            f"downloading MNIST needs torchvision (pip install 'capsnet[train]'): {error}"
        ) from None
    try:
        MNIST(str(root), train=True, download=True)
    except (OSError, RuntimeError) as error:  # no network, proxy, server down, bad checksum
        raise DatasetNotFoundError(
            f"downloading MNIST into {raw_dir(root)} failed ({error}). Copy the four IDX "
            f"files ({', '.join(MNIST_FILES)}) there by hand, or point --data-dir / "
            f"${DATA_DIR_ENV} at a directory that holds MNIST/raw."
        ) from None


def load_split(options, split: str, device: torch.device):
    """One split as an ``ExampleSet`` (the ``load`` of the registered MNIST spec)."""
    images = load_mnist(
        options.root, train=split == "train", device=device, download=options.download
    )
    images = images.head(options.limit)
    if options.image_shape is not None:
        images = images.padded_to(options.image_shape[1], options.image_shape[2])
    return ShiftedImages(images, options.max_shift if split == "train" else 0)
