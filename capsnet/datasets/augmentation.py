"""The paper's only augmentation: random shifts with zero padding (Sec. 5), vectorised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Sec. 5: "shifted by up to 2 pixels in each direction with zero padding".
PAPER_MAX_SHIFT = 2


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


class ShiftedImages:
    """An :class:`~capsnet.datasets.image_set.ImageSet` as an ``ExampleSet``: training
    batches (given a generator) are randomly shifted by up to ``max_shift`` pixels."""

    def __init__(self, images, max_shift: int) -> None:
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
        self.images = images
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> Tensor:
        return self.images.labels

    def batch(
        self, indices: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        images, labels = self.images.batch(indices)
        if generator is not None:
            images = random_shift(images, self.max_shift, generator)
        return images, labels
