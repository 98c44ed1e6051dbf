"""MultiMNIST (Sec. 6): two MNIST digits of different classes, overlaid on a 36x36 canvas.

Sec. 6 of Sabour, Frosst & Hinton (2017): "We generate the MultiMNIST training and test
dataset by overlaying a digit on top of another digit from the same set (training or test)
but different class. Each digit is shifted up to 4 pixels in each direction resulting in a
36x36 image." The pixel values of the two digits are added and clipped at 1 (Fig. 5).
The details follow the official generator (``shift_write_multi_mnist`` in
research/capsules/input_data/mnist/mnist_shift.py): each digit is zero-padded by 4 pixels
and shifted independently by a uniform integer in [-4, 4] along each axis, zero-filled;
partners are other digits of another class; the sum is clipped at the maximum intensity.

Here, every example is computed from its parameters (two digit indices and two shifts) on
the training device, so no image file is written:

* training: one pair per MNIST training digit per epoch, that digit first; its partner
  (uniform among the digits of the other classes) and both shifts are drawn from the
  step's seeded generator, so every epoch sees new pairs (the paper's 60M pairs are 1,000
  per digit: 1,000 epochs here) and a resumed run sees the same ones;
* test: a fixed set, ``test_copies`` pairs per test digit (default 10: 100,000 pairs from
  the 10,000 test digits; the paper's 1,000 give 10M), partners drawn without replacement
  among the other classes, from a generator seeded with :data:`TEST_SEED`. Only the
  parameters are stored (12 bytes a pair): the set is the same on every machine and
  device, and building it takes well under a second, so nothing is cached on disk.

Each example's targets are :class:`PairTargets`: both labels, and each digit alone as
shifted in the overlay (what that digit's reconstruction is compared with, as in the
official code's two reconstruction targets).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from capsnet.datasets.augmentation import shift_images
from capsnet.datasets.image_set import ImageSet
from capsnet.datasets.ink import box_overlap, ink_boxes
from capsnet.datasets.mnist import IMAGE_SHAPE, NUM_CLASSES, load_mnist

CANVAS = 36
# Sec. 6: "Each digit is shifted up to 4 pixels in each direction".
MAX_SHIFT = 4
# Fig. 5 / Table 1 test set: 10 pairs per test digit by default (the paper: 1,000).
DEFAULT_TEST_COPIES = 10
TEST_SEED = 6  # the test set's seed: a constant, so that every run is tested on the same pairs
MAX_INTENSITY = 255


class PairTargets(NamedTuple):
    """What a MultiMNIST example is trained and scored against.

    Attributes:
        labels: int64 ``[B, 2]``, the classes of the first and the second digit (always
            different).
        digits: float ``[B, 2, C, H, W]`` in [0, 1], each digit alone, shifted as in the
            overlay: the target of the reconstruction from that digit's capsule.
    """

    labels: Tensor
    digits: Tensor

    def to(self, device: torch.device | str) -> PairTargets:
        return PairTargets(self.labels.to(device), self.digits.to(device))


class DigitPool:
    """The digits pairs are made of, on one device, with an index by class for drawing
    partners of another class.

    Args:
        digits: uint8 images centred on the canvas, with int64 labels ``[N]``.
    """

    def __init__(self, digits: ImageSet) -> None:
        if digits.labels.dim() != 1:
            raise ValueError(f"digit labels must be [N], got {tuple(digits.labels.shape)}")
        self.digits = digits
        labels = digits.labels
        counts = torch.bincount(labels, minlength=NUM_CLASSES)
        missing = [c for c in range(NUM_CLASSES) if counts[c] == 0]
        if int((counts > 0).sum()) < 2:
            raise ValueError(
                f"MultiMNIST needs digits of at least two classes; these {len(labels)} "
                f"digits lack classes {missing}"
            )
        self.class_count = counts
        self.class_start = torch.cumsum(counts, 0) - counts
        self.by_class = torch.argsort(labels, stable=True)  # positions grouped by class

    def __len__(self) -> int:
        return len(self.digits)

    @property
    def device(self) -> torch.device:
        return self.digits.device

    def partners(self, first: Tensor, uniforms: Tensor) -> Tensor:
        """For each digit index in ``first``, the index of a digit of another class:
        uniform over all of them when ``uniforms`` are uniform in [0, 1)."""
        label = self.digits.labels[first]
        others = len(self) - self.class_count[label]  # digits of the other classes
        rank = (uniforms * others).long().clamp_(max=others - 1)
        # Rank among the class-sorted digits with this class's block left out.
        rank = rank + (rank >= self.class_start[label]).long() * self.class_count[label]
        return self.by_class[rank]

    def distinct_partners(self, copies: int, generator: torch.Generator) -> Tensor:
        """``[N, copies]``: for every digit, ``copies`` different digits of other classes
        (drawn without replacement, as in the official generator), from a CPU generator."""
        labels = self.digits.labels.cpu()
        by_class = self.by_class.cpu()
        partners = torch.empty(len(self), copies, dtype=torch.long)
        for label in range(NUM_CLASSES):
            members = (labels == label).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            start, count = int(self.class_start[label]), int(self.class_count[label])
            others = torch.cat([by_class[:start], by_class[start + count :]])
            if copies > len(others):
                raise ValueError(
                    f"test_copies={copies} pairs per digit need as many digits of other "
                    f"classes; class {label} has only {len(others)} partners here"
                )
            keys = torch.rand(len(members), len(others), generator=generator)
            chosen = keys.topk(copies, dim=1).indices  # a uniformly random subset, in random order
            partners[members] = others[chosen]
        return partners.to(self.device)


def overlay(digits: ImageSet, first: Tensor, second: Tensor, shifts: Tensor, max_shift: int):
    """The MultiMNIST images of digit pairs ``(first[b], second[b])``.

    Args:
        digits: uint8 images centred on the canvas.
        first, second: digit indices ``[B]``.
        shifts: integer ``[B, 2, 2]``: ``shifts[b, k] = (down, right)`` of digit ``k``.
        max_shift: the largest shift, ``|shifts| <= max_shift``.

    Returns:
        ``images [B, C, H, W]`` (the clipped sum) and ``digits [B, 2, C, H, W]`` (each
        shifted digit alone), float in [0, 1]. The sum is clipped on the integer
        intensities, as the official generator does, so it is exact.
    """
    pair = torch.stack([first, second], dim=1).flatten()  # [2B]: first0, second0, first1, ...
    raw = digits.images.index_select(0, pair)
    moved = shift_images(raw, shifts.reshape(-1, 2).to(raw.device), max_shift)
    moved = moved.view(first.shape[0], 2, *moved.shape[1:])
    merged = moved.sum(dim=1, dtype=torch.int16).clamp_(max=MAX_INTENSITY)
    return merged.float().div_(MAX_INTENSITY), moved.float().div_(MAX_INTENSITY)


class RandomPairs:
    """MultiMNIST training pairs, made on the fly: example ``i`` of an epoch is digit ``i``
    overlaid with a random digit of another class, both randomly shifted, all drawn from
    the training step's generator."""

    def __init__(self, pool: DigitPool, max_shift: int) -> None:
        self.pool = pool
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.pool)

    def batch(self, indices: Tensor, generator: torch.Generator | None = None):
        if generator is None:
            raise ValueError(
                "MultiMNIST training pairs are drawn from the training step's generator; "
                "evaluate on the fixed test pairs (split 'test')"
            )
        first = indices.to(self.pool.device, non_blocking=True)
        device = self.pool.device
        uniforms = torch.rand(first.shape[0], generator=generator, device=device, dtype=torch.float64)
        second = self.pool.partners(first, uniforms)
        shifts = torch.randint(
            -self.max_shift, self.max_shift + 1, (first.shape[0], 2, 2),
            generator=generator, device=device,
        )  # fmt: skip
        return _example(self.pool.digits, first, second, shifts, self.max_shift)


class FixedPairs:
    """A fixed set of MultiMNIST pairs, stored as parameters and drawn when batched.

    Args:
        pool: the digits.
        first, second: digit indices of each pair ``[M]``.
        shifts: int8 ``[M, 2, 2]``, each digit's ``(down, right)`` shift.
        max_shift: the largest shift.
    """

    def __init__(
        self, pool: DigitPool, first: Tensor, second: Tensor, shifts: Tensor, max_shift: int
    ) -> None:
        self.pool = pool
        self.first, self.second, self.shifts = first, second, shifts
        self.max_shift = max_shift

    def __len__(self) -> int:
        return self.first.shape[0]

    @property
    def labels(self) -> Tensor:
        """int64 ``[M, 2]``: the classes of every pair."""
        labels = self.pool.digits.labels
        return torch.stack([labels[self.first], labels[self.second]], dim=1)

    def batch(self, indices: Tensor, generator: torch.Generator | None = None):
        """The pairs at ``indices``; they are fixed, so ``generator`` changes nothing."""
        indices = indices.to(self.first.device, non_blocking=True)
        return _example(
            self.pool.digits, self.first[indices], self.second[indices],
            self.shifts[indices].long(), self.max_shift,
        )  # fmt: skip


def _example(digits: ImageSet, first: Tensor, second: Tensor, shifts: Tensor, max_shift: int):
    images, alone = overlay(digits, first, second, shifts, max_shift)
    labels = torch.stack([digits.labels[first], digits.labels[second]], dim=1)
    return images, PairTargets(labels, alone)


def fixed_pairs(pool: DigitPool, copies: int, max_shift: int, seed: int = TEST_SEED) -> FixedPairs:
    """``copies`` pairs for every digit of ``pool`` (that digit first; pair ``c * N + i`` is
    digit ``i``'s ``c``-th, for ``N`` digits), with partners drawn without replacement among the other classes and independent shifts,
    from a CPU generator seeded with ``seed``: the same set on every machine."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive int, got {copies!r}")
    generator = torch.Generator().manual_seed(seed)
    # Copy-major order: the first len(pool) pairs hold every digit once, so any prefix of
    # the set (a figure's first examples, a quick look) shows different digits.
    second = pool.distinct_partners(copies, generator).t().flatten()
    first = torch.arange(len(pool), device=pool.device).repeat(copies)
    shifts = torch.randint(
        -max_shift, max_shift + 1, (first.shape[0], 2, 2), generator=generator
    ).to(torch.int8)
    return FixedPairs(pool, first, second, shifts.to(pool.device), max_shift)


def ink_box_overlap(digits: Tensor) -> Tensor:
    """How much the two digits of each example overlap: ``digits [B, 2, 1, H, W]`` (each
    digit alone, as in :class:`PairTargets`) -> the fraction of each digit's ink bounding
    box covered by the other's, averaged over the two (float64 ``[B]``). Sec. 6 reports an
    average of 80% for its idealised 20x20 boxes; docs/EXPERIMENTS.md has this set's."""
    return box_overlap(ink_boxes(digits[:, 0]), ink_boxes(digits[:, 1]))


def nominal_box_overlap(shifts: Tensor, box: int = 20) -> Tensor:
    """The overlap the paper's argument assumes: two ``box x box`` boxes (a digit's
    bounding box in MNIST's 28x28 frame is at most 20x20) displaced by the difference of
    the digits' shifts ``[B, 2, 2]``: ``(box - |dy|)(box - |dx|) / box^2`` (float64 ``[B]``)."""
    offset = (shifts[:, 0].double() - shifts[:, 1].double()).abs()
    return ((box - offset).clamp(min=0) / box).prod(dim=1)


def digit_pool(options, split: str, device: torch.device) -> DigitPool:
    """The MNIST digits of ``split`` (the first ``options.limit``), centred on the canvas."""
    digits = load_mnist(
        options.root, train=split == "train", device=device, download=options.download
    ).head(options.limit)
    _, height, width = options.image_shape or (IMAGE_SHAPE[0], CANVAS, CANVAS)
    return DigitPool(digits.padded_to(height, width))


def load_split(options, split: str, device: torch.device):
    """One split as an ``ExampleSet`` (the ``load`` of the registered MultiMNIST spec)."""
    pool = digit_pool(options, split, device)
    if split == "train":
        return RandomPairs(pool, options.max_shift)
    return fixed_pairs(pool, options.test_copies or DEFAULT_TEST_COPIES, options.max_shift)
