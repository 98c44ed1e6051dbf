"""Where the ink of digit images is: bounding boxes and their overlap.

Used to keep affine-transformed digits on their canvas and to measure how much the two
digits of a MultiMNIST example overlap (Sec. 6: "two digits bounding boxes on average have
80% overlap").
"""

from __future__ import annotations

import torch
from torch import Tensor


def ink_boxes(images: Tensor) -> Tensor:
    """``[M, 4]`` int64 ``(top, bottom, left, right)`` of the non-zero pixels of each
    one-channel image ``[M, 1, H, W]`` (inclusive bounds); an image without ink gives
    ``(0, -1, 0, -1)`` (an empty box)."""
    ink = images[:, 0] > 0
    top, bottom = _first_last(ink.any(dim=2))
    left, right = _first_last(ink.any(dim=1))
    return torch.stack([top, bottom, left, right], dim=1)


def _first_last(mask: Tensor) -> tuple[Tensor, Tensor]:
    index = torch.arange(mask.shape[1], device=mask.device)
    first = torch.where(mask, index, mask.shape[1]).min(dim=1).values
    last = torch.where(mask, index, -1).max(dim=1).values
    return torch.where(mask.any(dim=1), first, 0), last


def box_area(boxes: Tensor) -> Tensor:
    """Pixels in each ``(top, bottom, left, right)`` box (0 for an empty box)."""
    height = (boxes[:, 1] - boxes[:, 0] + 1).clamp(min=0)
    width = (boxes[:, 3] - boxes[:, 2] + 1).clamp(min=0)
    return height * width


def box_intersection(first: Tensor, second: Tensor) -> Tensor:
    """The boxes common to ``first[m]`` and ``second[m]`` (possibly empty)."""
    return torch.stack(
        [
            torch.maximum(first[:, 0], second[:, 0]),
            torch.minimum(first[:, 1], second[:, 1]),
            torch.maximum(first[:, 2], second[:, 2]),
            torch.minimum(first[:, 3], second[:, 3]),
        ],
        dim=1,
    )


def box_overlap(first: Tensor, second: Tensor) -> Tensor:
    """Overlap of two boxes as the paper measures it for equal 20x20 boxes: the fraction of
    a box that the other covers. For boxes of different sizes, the mean of the two
    fractions: ``(I / A1 + I / A2) / 2`` with I the intersection's area (float64 ``[M]``)."""
    shared = box_area(box_intersection(first, second)).double()
    first_area = box_area(first).double().clamp(min=1)
    second_area = box_area(second).double().clamp(min=1)
    return (shared / first_area + shared / second_area) / 2
