"""An affNIST-like test set: the MNIST test digits under random affine transformations, 40x40.

affNIST itself (T. Tieleman, https://www.cs.toronto.edu/~tijmen/affNIST/) cannot be
downloaded here, so this module builds a set the same way from the MNIST test digits, the
digits affNIST's test set was made from. Each image is the digit, centred on a 40x40
canvas, transformed about the canvas centre by

    A = rotation(theta) @ shear(s) @ scale(sx, sy)        (x to the right, y down)

with independent uniform draws of the ranges below, resampled bilinearly (zero outside the
source), rounded to 8-bit intensities, and then translated by a whole number of pixels to
a uniformly random position at which all its ink (non-zero pixels) lies inside the 40x40
canvas. The ranges are those the affNIST page gives for its transformations (rotation up
to 20 degrees either way, shear factor up to 0.2 either way, horizontal and vertical scale
each between 0.8 and 1.2, translation anywhere that keeps the digit in the image), taken
from memory of that page: the stored copy available while writing this showed only its
introduction, so they could not be checked against it again; the order of composition is
not stated there and is this module's choice.

The set is a pure function of the MNIST test digits, ``copies`` (transformed versions per
digit; affNIST's test set has 32 per digit, 320,000 images; the default here is 1, 10,000
images) and :data:`AFFINE_SEED`: it is computed on the CPU, whatever the model's device,
in a few seconds per 10,000 images on one core (5 s on a loaded machine), and kept as uint8
(1.6 KB an image). :func:`affine_set` caches it on disk (``capsnet.datasets.cache``: one
verified file per digits, copies, seed and generator version), because the resampling runs
in ATen's vectorised CPU kernels, which round differently per instruction set: on one AMD
EPYC the AVX2 and AVX-512 kernels gave identical sets, while the non-vector one
(ATEN_CPU_CAPABILITY=default) differed in 55 of the 16,000,000 pixels (one pixel in each of
55 images, by one intensity level). With the cache, every evaluation on a machine sees the
images built there first, and the file can be copied to make another machine's evaluation
bitwise the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from capsnet.datasets.augmentation import ShiftedImages, shift_images
from capsnet.datasets.cache import cached_tensor, tensor_digest
from capsnet.datasets.image_set import ImageSet
from capsnet.datasets.ink import ink_boxes

CANVAS = 40
MAX_ROTATION_DEGREES = 20.0
MAX_SHEAR = 0.2
SCALE_RANGE = (0.8, 1.2)
AFFINE_SEED = 40  # constant: every checkpoint is evaluated on the same images
# Part of the cache key: raise it whenever a change to this module changes the images made
# from the same digits, copies and seed, so that no cached set of the old kind is used.
GENERATOR_VERSION = 1
_CHUNK = 2048  # images transformed at once (bounds the memory of the shift's padding)


class AffineParameters(NamedTuple):
    """The transformation of every image of the set (float64 ``[M]`` each; the translation
    int64 ``[M, 2]`` as ``(down, right)`` pixels after the centred transform)."""

    rotation_degrees: Tensor
    shear: Tensor
    scale_x: Tensor
    scale_y: Tensor
    translation: Tensor


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


def draw_linear_parameters(count: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Rotation (degrees), shear, horizontal and vertical scale of ``count`` images."""
    rotation = _uniform(generator, count, -MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)
    shear = _uniform(generator, count, -MAX_SHEAR, MAX_SHEAR)
    scale_x = _uniform(generator, count, *SCALE_RANGE)
    scale_y = _uniform(generator, count, *SCALE_RANGE)
    return rotation, shear, scale_x, scale_y


def linear_maps(
    rotation_degrees: Tensor, shear: Tensor, scale_x: Tensor, scale_y: Tensor
) -> Tensor:
    """``[M, 2, 2]`` float64: ``rotation @ shear @ scale``, acting on ``(x, y)`` column
    vectors (x to the right, y down; a positive angle turns clockwise on screen)."""
    theta = torch.deg2rad(rotation_degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros, ones = torch.zeros_like(shear), torch.ones_like(shear)
    rotate = torch.stack([cos, -sin, sin, cos], dim=1).view(-1, 2, 2)
    shear_x = torch.stack([ones, shear, zeros, ones], dim=1).view(-1, 2, 2)  # x += s * y
    scale = torch.stack([scale_x, zeros, zeros, scale_y], dim=1).view(-1, 2, 2)
    return rotate @ shear_x @ scale


def transform_centred(images: Tensor, maps: Tensor) -> Tensor:
    """Apply the linear ``maps [M, 2, 2]`` about the centre of square uint8 ``images
    [M, 1, S, S]``; bilinear, zero outside; returns uint8 (rounded)."""
    # affine_grid maps output coordinates to source coordinates: the inverse map. On a
    # square canvas the normalised coordinates are the pixel coordinates scaled equally in
    # x and y, so the same 2x2 matrix applies.
    inverse = torch.linalg.inv(maps)
    theta = torch.cat([inverse, torch.zeros(maps.shape[0], 2, 1, dtype=maps.dtype)], dim=2)
    grid = F.affine_grid(theta.float(), list(images.shape), align_corners=False)
    moved = F.grid_sample(
        images.float() / 255.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return (moved * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _check_copies(copies: int) -> None:
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive int, got {copies!r}")


def affine_digits(
    digits: Tensor, copies: int, seed: int = AFFINE_SEED, canvas: int = CANVAS
) -> tuple[Tensor, AffineParameters]:
    """``copies`` randomly transformed versions of each uint8 digit ``[N, 1, 28, 28]`` on a
    ``canvas x canvas`` image (image ``c * N + i`` is digit ``i``'s ``c``-th version), and
    their parameters. Deterministic given ``seed``; runs on the CPU.

    Raises:
        ValueError: a transformed digit does not fit on the canvas (its ink reaches the
            border before the translation); not possible for MNIST digits with these
            ranges, checked so that no image is silently cut.
    """
    _check_copies(copies)
    digits = digits.cpu()
    _, _, height, width = digits.shape
    if height > canvas or width > canvas:
        raise ValueError(f"{height}x{width} digits do not fit a {canvas}x{canvas} canvas")
    top, left = (canvas - height) // 2, (canvas - width) // 2
    centred = F.pad(digits, (left, canvas - width - left, top, canvas - height - top))
    count = digits.shape[0] * copies
    generator = torch.Generator().manual_seed(seed)
    rotation, shear, scale_x, scale_y = draw_linear_parameters(count, generator)
    maps = linear_maps(rotation, shear, scale_x, scale_y)
    # The translation's uniforms come after all the shapes': a set with more copies begins
    # with other images, but each set is fixed by (digits, copies, seed).
    translation_uniforms = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    source = torch.arange(digits.shape[0]).repeat(copies)  # copy-major, as documented
    out = torch.empty(count, 1, canvas, canvas, dtype=torch.uint8)
    translation = torch.empty(count, 2, dtype=torch.long)
    for start in range(0, count, _CHUNK):
        part = slice(start, min(start + _CHUNK, count))
        shaped = transform_centred(centred[source[part]], maps[part])
        box = ink_boxes(shaped)
        has_ink = box[:, 1] >= 0
        touching = (box[:, 0] == 0) | (box[:, 2] == 0)
        touching |= (box[:, 1] == canvas - 1) | (box[:, 3] == canvas - 1)
        if bool((touching & has_ink).any()):
            bad = start + int((touching & has_ink).nonzero()[0, 0])
            raise ValueError(
                f"affine image {bad} (digit {int(source[bad])}) reaches the border of the "
                f"{canvas}x{canvas} canvas before translation: it would be cut"
            )
        # Shifts keeping the ink box inside: down in [-top, canvas-1-bottom], likewise right.
        low = torch.stack([-box[:, 0], -box[:, 2]], dim=1)
        high = torch.stack([canvas - 1 - box[:, 1], canvas - 1 - box[:, 3]], dim=1)
        high = torch.where(has_ink.unsqueeze(1), high, low)  # an empty image stays put
        span = (high - low + 1).double()
        shift = low + (translation_uniforms[part] * span).long().clamp_(max=(span - 1).long())
        translation[part] = shift
        out[part] = shift_images(shaped, shift, canvas - 1)
    return out, AffineParameters(rotation, shear, scale_x, scale_y, translation)


def affine_set(digits: ImageSet, copies: int, image_size: tuple[int, int]) -> ShiftedImages:
    """The affNIST-like evaluation set of ``digits`` (MNIST test digits) as an
    ``ExampleSet`` on their device, padded to ``image_size`` when that exceeds 40x40; read
    from the on-disk cache when it holds this set (see the module's docstring)."""
    _check_copies(copies)
    key = {
        "generator_version": GENERATOR_VERSION,
        "seed": AFFINE_SEED,
        "copies": copies,
        "canvas": CANVAS,
        "ranges": [MAX_ROTATION_DEGREES, MAX_SHEAR, list(SCALE_RANGE)],
        "digits_sha256": tensor_digest(digits.images, digits.labels),
    }
    images = cached_tensor("affine-mnist", key, lambda: affine_digits(digits.images, copies)[0])
    labels = digits.labels.cpu().repeat(copies)
    made = ImageSet(images, labels).padded_to(*image_size).to(digits.device)
    return ShiftedImages(made, 0)


def relative_area(parameters: AffineParameters) -> Tensor:
    """Area scale factor of each transformation (``|det A| = sx * sy``)."""
    return parameters.scale_x * parameters.scale_y


__all__ = [
    "AFFINE_SEED",
    "CANVAS",
    "GENERATOR_VERSION",
    "MAX_ROTATION_DEGREES",
    "MAX_SHEAR",
    "SCALE_RANGE",
    "AffineParameters",
    "affine_digits",
    "affine_set",
    "linear_maps",
    "relative_area",
]
