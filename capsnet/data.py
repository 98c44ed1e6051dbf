"""MNIST as tensors on the training device, batch order, and the paper's shift augmentation.

The whole data set (47 MB as uint8 for the 60,000 training images) lives on the training
device; a batch is one index operation, one conversion to float and one vectorised shift,
with no per-sample Python and no DataLoader workers.

Everything random here is a pure function of ``(seed, epoch, step, rank)`` through
:func:`derive_seed`, so a run resumed from a checkpoint sees exactly the batches and shifts
an uninterrupted run would have seen, at any step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATA_DIR_ENV = "CAPSNET_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Sec. 5: "shifted by up to 2 pixels in each direction with zero padding".
PAPER_MAX_SHIFT = 2

# Separate random streams: the batch order and the shifts never share a seed.
_ORDER_STREAM = 1
_SHIFT_STREAM = 2


class DatasetNotFoundError(FileNotFoundError):
    """The MNIST files are not where we looked (the message says where and how to supply them)."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The MNIST root: ``data_dir`` if given, else ``$CAPSNET_DATA_DIR``, else ``./data``.

    The root is the directory that holds ``MNIST/raw`` (torchvision's layout).
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


@dataclass
class ImageSet:
    """Images and labels held as tensors on one device.

    Attributes:
        images: uint8 ``[N, C, H, W]`` (4x smaller than float; converted per batch).
        labels: int64 ``[N]``.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N = {self.images.shape[0]}, "
                f"got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def head(self, count: int | None) -> ImageSet:
        """The first ``count`` samples (all when ``count`` is None); MNIST's order is not
        sorted by class, so a prefix is close to class-balanced."""
        if count is None:
            return self
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        return ImageSet(self.images[:count], self.labels[:count])

    def padded_to(self, height: int, width: int) -> ImageSet:
        """Centre the images on a zero canvas of ``height x width`` (e.g. 36x36 for the
        paper's affNIST set-up, Sec. 5.2); the same set if already that size."""
        _, _, old_height, old_width = self.images.shape
        if (height, width) == (old_height, old_width):
            return self
        if height < old_height or width < old_width:
            raise ValueError(
                f"cannot pad {old_height}x{old_width} images to a smaller {height}x{width} canvas"
            )
        top, left = (height - old_height) // 2, (width - old_width) // 2
        padding = (left, width - old_width - left, top, height - old_height - top)
        return ImageSet(F.pad(self.images, padding), self.labels)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Float images in [0, 1] and labels for ``indices`` (any device; moved here)."""
        indices = indices.to(self.device, non_blocking=True)
        images = self.images.index_select(0, indices).float().div_(255.0)
        return images, self.labels.index_select(0, indices)


def load_mnist(
    root: str | os.PathLike,
    train: bool,
    device: str | torch.device = "cpu",
    download: bool = False,
) -> ImageSet:
    """Read MNIST with torchvision from ``root/MNIST/raw`` into tensors on ``device``.

    Downloads only when ``download`` is True. Raises :class:`DatasetNotFoundError` naming
    the directory it searched and the ways to supply the data.
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError as error:  # torchvision is needed for training only
        raise ImportError(
            f"reading MNIST needs torchvision (pip install torchvision): {error}"
        ) from error

    root = Path(root).expanduser()
    raw_dir = root / "MNIST" / "raw"
    try:
        dataset = MNIST(str(root), train=train, download=download)
    except RuntimeError as error:
        if "not found" not in str(error).lower():
            raise
        raise DatasetNotFoundError(_not_found_message(root, raw_dir)) from None
    except OSError as error:  # download failed: no network, proxy, server down
        raise DatasetNotFoundError(
            f"downloading MNIST into {raw_dir} failed ({error}). Copy the four IDX files "
            f"({', '.join(MNIST_FILES)}) there by hand, or point --data-dir / ${DATA_DIR_ENV} "
            "at a directory that holds MNIST/raw."
        ) from error
    images = dataset.data.unsqueeze(1).contiguous()  # [N, 1, 28, 28] uint8
    labels = dataset.targets.to(torch.long)
    return ImageSet(images.to(device), labels.to(device))


def _not_found_message(root: Path, raw_dir: Path) -> str:
    missing = [name for name in MNIST_FILES if not (raw_dir / name).is_file()]
    return (
        f"MNIST not found: looked in {raw_dir.resolve()} (data directory {root}) and "
        f"found no {', '.join(missing) or 'readable IDX files'}. Supply it with --data-dir DIR "
        f"(the directory that contains MNIST/raw; e.g. ../shared/data), the {DATA_DIR_ENV} "
        "environment variable, or --download to fetch it (download=True from Python)."
    )


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints, e.g. ``(seed, stream, epoch, step)``.

    ``numpy.random.SeedSequence`` hashes the whole tuple, so nearby tuples (step 7 vs 8) give
    unrelated streams, unlike ``seed + step``.
    """
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"seed components must be non-negative ints, got {values}")
    state = np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def epoch_order(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The shuffled sample order of one epoch (a CPU int64 permutation), the same on every rank."""
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, _ORDER_STREAM, epoch))
    return torch.randperm(num_samples, generator=generator)


def shard(order: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of ``order``: every ``world_size``-th sample from ``rank`` on.

    The tail is dropped so that every rank gets the same number of samples (as in
    ``DistributedSampler(drop_last=True)``): DistributedDataParallel needs every rank to run
    the same number of steps.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    per_rank = len(order) // world_size
    return order[rank : per_rank * world_size : world_size]


def num_batches(num_samples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be smaller."""
    return -(-num_samples // batch_size)


def shift_generator(
    device: torch.device, seed: int, epoch: int, step: int, rank: int = 0
) -> torch.Generator:
    """The generator for the shifts of one training step on one rank."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, _SHIFT_STREAM, epoch, step, rank))
    return generator


def shift_images(images: Tensor, shifts: Tensor, max_shift: int) -> Tensor:
    """Translate each image by its own ``(down, right)`` shift, filling with zeros.

    Args:
        images: ``[B, C, H, W]``.
        shifts: integer ``[B, 2]``; ``shifts[b] = (dy, dx)`` moves image ``b`` down by ``dy``
            and right by ``dx`` pixels, ``|dy|, |dx| <= max_shift``.
        max_shift: the zero padding added before cropping.

    Output pixel ``(i, j)`` of image ``b`` is input pixel ``(i - dy, j - dx)``, or 0 where
    that lies outside the image. Vectorised: one pad and two gathers for the whole batch.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if shifts.shape != (images.shape[0], 2):
        raise ValueError(
            f"shifts must be [B, 2] with B = {images.shape[0]}, got {tuple(shifts.shape)}"
        )
    if max_shift == 0:
        return images
    batch, channels, height, width = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    # Crop origin in the padded image: max_shift - shift (a shift down = a crop higher up).
    top = (max_shift - shifts[:, 0]).to(torch.long)
    left = (max_shift - shifts[:, 1]).to(torch.long)
    rows = top[:, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = left[:, None] + torch.arange(width, device=images.device)  # [B, W]
    padded_width = width + 2 * max_shift
    row_index = rows.view(batch, 1, height, 1).expand(batch, channels, height, padded_width)
    cropped_rows = padded.gather(2, row_index)  # [B, C, H, W + 2s]
    col_index = cols.view(batch, 1, 1, width).expand(batch, channels, height, width)
    return cropped_rows.gather(3, col_index)


def random_shift(
    images: Tensor, max_shift: int = PAPER_MAX_SHIFT, generator: torch.Generator | None = None
) -> Tensor:
    """Shift each image by independent uniform ``dy, dx`` in ``[-max_shift, max_shift]`` with
    zero padding: the paper's only augmentation (Sec. 5, ``max_shift = 2``).

    ``generator`` must live on the images' device; the draw happens there, so no host sync.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    if max_shift == 0:
        return images
    shifts = torch.randint(
        -max_shift, max_shift + 1, (images.shape[0], 2), generator=generator, device=images.device
    )
    return shift_images(images, shifts, max_shift)
