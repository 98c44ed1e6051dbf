"""Expanded MNIST (Sec. 5.2): each MNIST digit at a random position on a 40x40 black canvas.

Sec. 5.2: "we trained a CapsNet on a padded and translated MNIST training set, in which
each example is an MNIST digit placed randomly on a black background of 40x40 pixels." The
28x28 digit image goes anywhere on the canvas where it fits whole: a uniform integer offset
in [0, 12] along each axis, i.e. a shift of up to 6 pixels from the centre (``max_shift``).

* training: a new random position for every digit at every step, from the step's seeded
  generator (the paper's shift augmentation over the whole canvas);
* test: its own fixed test set, ``test_copies`` random positions per MNIST test digit
  (default 1: 10,000 images), seeded with :data:`TEST_SEED`;
* affine: the affNIST-like set (``capsnet.datasets.affine_mnist``) on which Sec. 5.2
  compares CapsNet with a CNN: the MNIST test digits under random affine transformations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from capsnet.datasets import affine_mnist
from capsnet.datasets.augmentation import ShiftedImages, shift_images
from capsnet.datasets.image_set import ImageSet
from capsnet.datasets.mnist import IMAGE_SHAPE, load_mnist

CANVAS = 40
MAX_SHIFT = (CANVAS - IMAGE_SHAPE[1]) // 2  # 6: the digit's 28x28 frame anywhere on the canvas
SPLITS = ("train", "test", "affine")
TEST_SEED = 52  # constant: every run is tested on the same placements


class PlacedImages:
    """A fixed set of images made by shifting source images: example ``m`` is image
    ``source[m]`` shifted by ``shifts[m]`` (zero fill).

    Args:
        images: uint8 source images, centred on the canvas.
        source: int64 ``[M]``, the source image of each example.
        shifts: integer ``[M, 2]``, ``(down, right)`` of each example.
        max_shift: the largest shift.
    """

    def __init__(self, images: ImageSet, source: Tensor, shifts: Tensor, max_shift: int) -> None:
        self.images, self.source, self.shifts, self.max_shift = images, source, shifts, max_shift

    def __len__(self) -> int:
        return self.source.shape[0]

    @property
    def labels(self) -> Tensor:
        return self.images.labels[self.source]

    def batch(self, indices: Tensor, generator: torch.Generator | None = None):
        """The examples at ``indices``; they are fixed, so ``generator`` changes nothing."""
        indices = indices.to(self.source.device, non_blocking=True)
        source = self.source[indices]
        raw = self.images.images.index_select(0, source)
        placed = shift_images(raw, self.shifts[indices].long(), self.max_shift)
        return placed.float().div_(255.0), self.images.labels[source]


def random_placements(images: ImageSet, copies: int, max_shift: int, seed: int) -> PlacedImages:
    """``copies`` uniformly random placements of every image, seeded; example ``c * N + i``
    is image ``i``'s ``c``-th placement."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive int, got {copies!r}")
    generator = torch.Generator().manual_seed(seed)
    count = len(images) * copies
    shifts = torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator)
    source = torch.arange(len(images)).repeat(copies)  # copy-major: a prefix shows every digit
    device = images.device
    return PlacedImages(images, source.to(device), shifts.to(torch.int8).to(device), max_shift)


def load_split(options, split: str, device: torch.device):
    """One split as an ``ExampleSet`` (the ``load`` of the registered expanded-MNIST spec)."""
    digits = load_mnist(
        options.root, train=split == "train", device=device, download=options.download
    ).head(options.limit)
    _, height, width = options.image_shape or (IMAGE_SHAPE[0], CANVAS, CANVAS)
    if split == "affine":
        return affine_mnist.affine_set(digits, options.test_copies or 1, (height, width))
    canvas = digits.padded_to(height, width)
    if split == "train":
        return ShiftedImages(canvas, options.max_shift)
    return random_placements(canvas, options.test_copies or 1, options.max_shift, TEST_SEED)
