"""CapsNet losses: the margin loss (Sec. 3, Eq. 4) and the reconstruction loss (Sec. 4.1).

Paper references are to Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules" (2017).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Sec. 3: "m+ = 0.9 and m- = 0.1", "We use lambda = 0.5".
MARGIN_POSITIVE = 0.9
MARGIN_NEGATIVE = 0.1
ABSENT_CLASS_WEIGHT = 0.5
# Sec. 4.1: "We scale down this reconstruction loss by 0.0005 so that it does not dominate
# the margin loss during training."
RECONSTRUCTION_WEIGHT = 0.0005


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def margin_loss(
    lengths: Tensor,
    labels: Tensor,
    m_plus: float = MARGIN_POSITIVE,
    m_minus: float = MARGIN_NEGATIVE,
    lambda_: float = ABSENT_CLASS_WEIGHT,
) -> Tensor:
    """Eq. 4, summed over classes ("the sum of the losses of all digit capsules") and
    averaged over the batch:

        L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2

    Args:
        lengths: capsule lengths ``|v_k|``, ``[B, num_classes]``.
        labels: true classes ``[B]`` (int64); ``T_k = 1`` for the labelled class only. Or
            ``[B, K]`` for K digits per image (MultiMNIST, Sec. 6: "margin loss with both
            digits present"): ``T_k = 1`` for every listed class.

    Returns:
        A scalar in the dtype of ``lengths`` (float32 at least).
    """
    if lengths.dim() != 2:
        raise ValueError(f"lengths must be [B, num_classes], got shape {tuple(lengths.shape)}")
    if labels.dim() not in (1, 2) or labels.shape[0] != lengths.shape[0]:
        raise ValueError(
            f"labels must be [B] or [B, K] with B = {lengths.shape[0]} to match lengths, "
            f"got shape {tuple(labels.shape)}"
        )
    lengths = lengths.to(_at_least_float32(lengths.dtype))
    # One-hot by comparison rather than F.one_hot, which checks the label range on the
    # host and so waits for the GPU at every step.
    classes = torch.arange(lengths.shape[1], device=lengths.device)
    listed = labels.view(labels.shape[0], -1, 1) == classes  # [B, K, num_classes]
    present = listed.any(dim=1).to(lengths.dtype)
    present_loss = present * torch.clamp(m_plus - lengths, min=0) ** 2
    absent_loss = lambda_ * (1 - present) * torch.clamp(lengths - m_minus, min=0) ** 2
    return (present_loss + absent_loss).sum(dim=1).mean()


def reconstruction_loss(reconstructions: Tensor, images: Tensor) -> Tensor:
    """Sum of squared pixel differences per image, averaged over the batch (Sec. 4.1); unscaled.

    Multiply by :data:`RECONSTRUCTION_WEIGHT` (0.0005) to get the term the paper adds to the
    margin loss; :func:`capsnet_loss` does that.
    """
    if reconstructions.shape != images.shape:
        raise ValueError(
            f"reconstructions must have the shape of images {tuple(images.shape)}, "
            f"got {tuple(reconstructions.shape)}"
        )
    # Squared errors in at least float32: under autocast the decoder may return bfloat16.
    dtype = _at_least_float32(torch.promote_types(reconstructions.dtype, images.dtype))
    difference = reconstructions.to(dtype) - images.to(dtype)
    return (difference**2).flatten(1).sum(dim=1).mean()


class CapsNetLossTerms(NamedTuple):
    """The total training loss and its two terms, reported separately.

    Attributes:
        total: ``margin + reconstruction``, the quantity to minimise.
        margin: :func:`margin_loss`.
        reconstruction: ``reconstruction_weight * reconstruction_loss`` (the scaled term that
            enters ``total``); zero when the model has no decoder.
    """

    total: Tensor
    margin: Tensor
    reconstruction: Tensor


def capsnet_loss(
    output,
    images: Tensor,
    labels: Tensor,
    reconstruction_weight: float = RECONSTRUCTION_WEIGHT,
) -> CapsNetLossTerms:
    """Margin loss plus ``reconstruction_weight`` times the reconstruction loss (Sec. 4.1).

    Args:
        output: a :class:`capsnet.model.CapsNetOutput` (anything with ``lengths`` and
            ``reconstructions``).
        images: the model's input images, the reconstruction target.
        labels: true classes ``[B]``.
        reconstruction_weight: 0.0005 in the paper; 0 turns the term off.
    """
    if reconstruction_weight < 0:
        raise ValueError(f"reconstruction_weight must be >= 0, got {reconstruction_weight}")
    margin = margin_loss(output.lengths, labels)
    if output.reconstructions is None or reconstruction_weight == 0:
        reconstruction = margin.new_zeros(())
    else:
        reconstruction = reconstruction_weight * reconstruction_loss(output.reconstructions, images)
    return CapsNetLossTerms(margin + reconstruction, margin, reconstruction)
