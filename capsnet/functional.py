"""Stateless capsule functions: :func:`squash` (Eq. 1) and the margin loss (Eq. 4).

Paper references are to Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules"
(NeurIPS 2017).
"""

from __future__ import annotations

import torch
from torch import Tensor

from capsnet.losses import margin_loss

__all__ = ["margin_loss", "squash"]


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """Eq. 1: ``squash(s) = |s|^2 / (1 + |s|^2) * s / |s|``, along ``dim``.

    Exact for every finite input, in every floating dtype: written as the length
    ``rho = |s|^2 / (1 + |s|^2)`` times the unit vector ``s / |s|``, with ``|s|`` computed from
    ``s`` divided by its largest component, so that no intermediate overflows or underflows
    where the result does not (``|s|^2`` alone overflows float32 from ``|s| ~ 1.8e19``).
    ``squash(0) = 0`` with a zero gradient (never NaN); a NaN or infinite component gives NaN.
    Differentiable any number of times. The fused kernels compute the same function
    (``csrc/routing_math.h``).
    """
    # The largest component, as a constant: |s| = largest * |s / largest| whatever its value,
    # so no gradient flows through it.
    largest = s.detach().abs().amax(dim=dim, keepdim=True)
    safe_largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    scaled = s / safe_largest
    scaled_sq_norm = (scaled * scaled).sum(dim=dim, keepdim=True)
    nonzero = scaled_sq_norm != 0  # True for NaN, which then reaches every component
    # The double `where` keeps sqrt's backward away from 0 (its derivative is infinite there).
    scaled_norm = torch.where(nonzero, torch.where(nonzero, scaled_sq_norm, 1.0).sqrt(), 0.0)
    unit = scaled / torch.where(nonzero, scaled_norm, 1.0)
    norm = safe_largest * scaled_norm
    # rho = n^2 / (1 + n^2), as 1 / (1 + 1/n^2) above n = 1 so that n^2 cannot overflow.
    big = norm > 1
    safe_big = torch.where(big, norm, 2.0)
    safe_small = torch.where(big, 0.0, norm)
    length = torch.where(
        big,
        1.0 / (1.0 + 1.0 / (safe_big * safe_big)),
        safe_small * safe_small / (1.0 + safe_small * safe_small),
    )
    return length * unit
