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

    ``squash(0) = 0`` with a zero gradient (never NaN); a NaN or infinite component makes
    its capsule NaN. Differentiable any number of times, also in forward mode. The fused
    kernels compute the same function (``csrc/routing_math.h``).

    Exact (to rounding of the result) for every finite input in every floating dtype, values
    and gradients, with one exception below. Two devices make it so:

    * float16, bfloat16 and float32 inputs are computed in float64, which holds the square of
      every finite value of those dtypes: no intermediate can overflow or underflow, and the
      result and the gradient are each rounded once to the input's dtype.
    * float64 inputs have no wider dtype: ``s`` is divided by its largest component (a
      constant for autograd: the result does not depend on the scale chosen), so that
      ``|s / largest|^2`` lies in ``[1, D]``, and the formula is chosen by the length ``n``:
      ``v = s n / (1 + n^2)`` up to ``n = 1`` and ``v = e / (1 + 1/n^2)`` with the unit vector
      ``e`` above it, so that neither ``n^2`` (which overflows float64 from ``n ~ 1e154``) nor
      ``n`` itself (which overflows when components are near the largest finite value) is
      needed where it is not finite. The exception: below ``n ~ 1e-154`` products of order
      ``n^2`` in the backward underflow: of the gradient
      ``phi(n) grad_v + n phi'(n) <e, grad_v> e`` (``phi(n) = n / (1 + n^2)``) only the first
      term remains.
    """
    # float64 for every dtype: exact for float16/bfloat16/float32 (see above). Apple's MPS
    # has no float64; there the scaled formula runs in float32 (values stay exact, gradients
    # hold down to |s| ~ 1e-19).
    x = s.to(torch.float32 if s.device.type == "mps" else torch.float64)
    # The largest component, as a constant: the formula is the same whatever it is, so no
    # gradient flows through it.
    largest = x.detach().abs().amax(dim=dim, keepdim=True)
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    t = x / scale
    t_sq_norm = (t * t).sum(dim=dim, keepdim=True)  # in [1, D], 0 for s = 0, NaN stays NaN
    nonzero = t_sq_norm != 0
    # The double `where` keeps sqrt's backward away from 0 (its derivative is infinite there);
    # each branch below is finite, with finite derivatives, where it is not selected too.
    t_norm = torch.where(nonzero, torch.where(nonzero, t_sq_norm, 1.0).sqrt(), 0.0)
    norm = scale * t_norm  # |s|; inf when |s| exceeds the largest finite value
    long = norm > 1
    short_norm = torch.where(long, 0.0, norm)
    short = x * (short_norm / (1.0 + short_norm * short_norm))
    inv_norm = 1.0 / torch.where(long, norm, 2.0)  # 0 when norm overflowed
    unit = t / torch.where(nonzero, t_norm, 1.0)
    return torch.where(long, unit / (1.0 + inv_norm * inv_norm), short).to(s.dtype)
