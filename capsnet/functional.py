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
    and gradients, with one exception (float64 capsules shorter than ~1e-154, below):

    * float16, bfloat16 and float32 inputs are computed as ``s * n / (1 + n^2)`` in float64,
      which holds the square of every finite value of those dtypes: nothing can overflow or
      underflow, and the result and the gradient are each rounded once to the input's dtype.
    * float64 inputs have no wider dtype: see :func:`_squash_scaled`.
    """
    if s.dtype == torch.float64:
        return _squash_scaled(s, dim)
    if s.device.type == "mps":  # no float64 there: values stay exact, gradients hold to ~1e-19
        return _squash_scaled(s.float(), dim).to(s.dtype)
    x = s.to(torch.float64)
    # vector_norm's backward, x * grad / |x|, is 0 at x = 0.
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return (x * (norm / (1.0 + norm * norm))).to(s.dtype)


def _squash_scaled(x: Tensor, dim: int) -> Tensor:
    """squash without an intermediate that overflows or underflows where the result does not.

    ``x`` is divided by its largest component (a constant for autograd: the result does not
    depend on the scale chosen), so that ``|x / largest|^2`` lies in ``[1, D]``, and the
    formula is chosen by the length ``n``: ``x n / (1 + n^2)`` up to ``n = 1`` and
    ``e / (1 + 1/n^2)`` with the unit vector ``e`` above it, so that neither ``n^2`` (which
    overflows float64 from ``n ~ 1e154``) nor ``n`` itself (which overflows when components
    are near the largest finite value) is needed where it is not finite. The exception:
    below ``n ~ 1e-154`` (float64) products of order ``n^2`` in the backward underflow, and
    of the gradient ``phi(n) grad_v + n phi'(n) <e, grad_v> e`` (``phi(n) = n / (1 + n^2)``)
    only the first term remains.
    """
    largest = x.detach().abs().amax(dim=dim, keepdim=True)
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    t = x / scale
    t_sq_norm = (t * t).sum(dim=dim, keepdim=True)  # in [1, D], 0 for x = 0, NaN stays NaN
    nonzero = t_sq_norm != 0
    # The double `where` keeps sqrt's backward away from 0 (its derivative is infinite there);
    # each branch below is finite, with finite derivatives, where it is not selected too.
    t_norm = torch.where(nonzero, torch.where(nonzero, t_sq_norm, 1.0).sqrt(), 0.0)
    norm = scale * t_norm  # |x|; inf when |x| exceeds the largest finite value
    long = norm > 1
    short_norm = torch.where(long, 0.0, norm)
    short = x * (short_norm / (1.0 + short_norm * short_norm))
    inv_norm = 1.0 / torch.where(long, norm, 2.0)  # 0 when norm overflowed
    unit = t / torch.where(nonzero, t_norm, 1.0)
    return torch.where(long, unit / (1.0 + inv_norm * inv_norm), short)
