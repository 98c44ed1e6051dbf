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
from typing import Protocol

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
        max_shift: training augmentation, pixels (Sec. 5).
        limit: use only the first ``limit`` examples of the split (None: all).
    """

    root: Path
    download: bool = False
    image_shape: tuple[int, int, int] | None = None
    max_shift: int = 0
    limit: int | None = None


class ExampleSet(Protocol):
    """One split of a data set, on the training device."""

    def __len__(self) -> int:
        """Examples per epoch (the loop shuffles and shards ``range(len(self))``)."""
        ...

    def batch(
        self, indices: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Float images ``[B, C, H, W]`` in [0, 1] and int64 labels (``[B]``, or ``[B, K]``
        for K labels per example). ``generator`` (on the set's device) is given for training
        batches: draw the augmentation from it and from nothing else, so that a resumed run
        sees the same batches. Evaluation passes None: no augmentation."""
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
        splits: the split names ``load`` accepts.
    """

    name: str
    summary: str
    num_classes: int
    image_shape: tuple[int, int, int]
    load: Callable[[DataOptions, str, torch.device], ExampleSet]
    splits: tuple[str, ...] = SPLITS

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
