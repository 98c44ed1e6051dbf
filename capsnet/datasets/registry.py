"""The data sets the training program knows, and what a new one must provide.

A data set plugs in by registering a :class:`DatasetSpec` (``register_dataset``): its
name (the ``--dataset`` choice), its classes and native image shape, and a ``load``
function that returns each split as an :class:`ExampleSet`. The training loop only calls
``ExampleSet.batch(indices, generator)``, so a data set that draws its examples on the fly
(overlaid digit pairs, random placements) needs no change to the loop: it gets the step's
seeded generator and makes its batch with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataOptions:
    """What the training program asks of a data set.

    Attributes:
        root: directory holding the data set's files.
        download: fetch missing files.
        image_shape: ``(C, H, W)`` the model consumes; images are padded with zeros to it.
        max_shift: training augmentation, pixels (Sec. 5); for data sets that place digits
            at random (MultiMNIST, expanded MNIST), the range of those placements.
        limit: use only the first ``limit`` MNIST digits of the split (None: all); synthetic
            data sets build their examples from these digits only.
        test_copies: examples a synthetic data set generates from each digit of a fixed
            evaluation split (MultiMNIST pairs per test digit, affine copies); None: the
            data set's default.
    """

    root: Path
    download: bool = False
    image_shape: tuple[int, int, int] | None = None
    max_shift: int = 0
    limit: int | None = None
    test_copies: int | None = None


class ExampleSet(Protocol):
    """One split of a data set, on the training device."""

    def __len__(self) -> int:
        """Examples per epoch (the loop shuffles and shards ``range(len(self))``)."""
        ...

    def batch(
        self, indices: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Any]:
        """Float images ``[B, C, H, W]`` in [0, 1] and their targets: int64 labels ``[B]``,
        or a NamedTuple of per-example tensors whose first field is the labels ``[B, K]``
        (K labels per example; MultiMNIST adds each digit's own image, the target of its
        reconstruction). The training objective is what reads the targets; the loop only
        passes them on. ``generator`` (on the set's device) is given for training batches:
        draw the augmentation, or the whole synthetic example, from it and from nothing
        else, so that a resumed run sees the same batches. Evaluation passes None: no
        augmentation, and a synthetic evaluation set is the same at every call."""
        ...


@dataclass(frozen=True)
class DatasetSpec:
    """A data set as the training program sees it.

    Attributes:
        name: the ``--dataset`` value.
        summary: one line for ``--help`` and the docs.
        num_classes: number of classes (digit capsules).
        image_shape: native ``(C, H, W)``; the model may ask for a larger canvas.
        load: ``load(options, split, device)`` -> :class:`ExampleSet`; raises a
            ``DatasetError`` subclass naming the file when the data are missing or damaged.
        splits: the split names ``load`` accepts ("train" and "test", and any further
            evaluation set, e.g. expanded MNIST's "affine").
        labels_per_example: classes present in each example (2 for MultiMNIST); the
            training program picks the objective and the accuracy measure from it.
        default_max_shift: the training shift when the run does not set one (``max_shift``
            is None): the paper's 2 pixels for MNIST, the placement range for data sets
            built from shifted digits.
        shift_within_canvas: the data set places whole 28x28 digits on its canvas, so a
            shift may not exceed ``(canvas - 28) // 2`` (MNIST's shift crops instead).
        default_test_copies: examples generated from each test digit (synthetic data sets).
    """

    name: str
    summary: str
    num_classes: int
    image_shape: tuple[int, int, int]
    load: Callable[[DataOptions, str, torch.device], ExampleSet]
    splits: tuple[str, ...] = SPLITS
    labels_per_example: int = 1
    default_max_shift: int = 0
    shift_within_canvas: bool = False
    default_test_copies: int = 1

    def image_shape_problem(self, shape: tuple[int, int, int]) -> str | None:
        """Why the model's input ``shape`` cannot be made from this data set (None if it can):
        images are padded, never cropped or resized."""
        channels, height, width = self.image_shape
        if shape[0] != channels or shape[1] < height or shape[2] < width:
            return (
                f"{self.name} images are {channels}x{height}x{width} and are only ever padded: "
                f"the model input must have {channels} channel(s) and be at least "
                f"{height}x{width}, got {'x'.join(map(str, shape))}"
            )
        return None

    def max_shift_problem(self, shape: tuple[int, int, int], max_shift: int) -> str | None:
        """Why ``max_shift`` cannot be used on a ``shape`` canvas (None if it can)."""
        if not self.shift_within_canvas:
            return None
        # The default shift is the largest on the native canvas; a larger canvas adds room.
        _, height, width = self.image_shape
        largest = (min(shape[1], shape[2]) - min(height, width)) // 2 + self.default_max_shift
        if max_shift > largest:
            return (
                f"{self.name} shifts whole digits on its canvas: at most {largest} pixels on "
                f"{shape[1]}x{shape[2]}, got {max_shift}"
            )
        return None

    @property
    def evaluation_splits(self) -> tuple[str, ...]:
        """The splits a checkpoint can be evaluated on (``--eval-set``)."""
        return tuple(split for split in self.splits if split != "train")


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"a data set named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def dataset_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; known data sets: {', '.join(_REGISTRY)}"
        ) from None
