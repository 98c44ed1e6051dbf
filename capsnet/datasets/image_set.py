"""Images and labels held as tensors on the training device.

A whole data set of small images (47 MB as uint8 for MNIST's 60,000 training images) fits
on any training device; a batch is then one index operation and one conversion to float,
with no per-sample Python and no DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ImageSet:
    """Images and labels on one device.

    Attributes:
        images: uint8 ``[N, C, H, W]`` (4x smaller than float; converted per batch).
        labels: int64 ``[N]``, or ``[N, K]`` for data sets with K labels per example.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dim() not in (1, 2) or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels must be [N] or [N, K] with N = {self.images.shape[0]}, "
                f"got {tuple(self.labels.shape)}"
            )
        if self.labels.dtype != torch.long:
            raise ValueError(f"labels must be int64, got {self.labels.dtype}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        return tuple(self.images.shape[1:])

    def to(self, device: str | torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))

    def head(self, count: int | None) -> ImageSet:
        """The first ``count`` examples (all when ``count`` is None or larger than the set);
        MNIST's order is not sorted by class, so a prefix is close to class-balanced."""
        if count is None:
            return self
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        return ImageSet(self.images[:count], self.labels[:count])

    def padded_to(self, height: int, width: int) -> ImageSet:
        """Centre the images on a zero canvas of ``height x width`` (e.g. 40x40 as in the
        paper's expanded MNIST, Sec. 5.2); the same set if already that size."""
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
