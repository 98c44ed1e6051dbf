"""Pure-PyTorch dynamic routing: the test oracle and the fallback backend.

Written for clarity, not speed: it follows ``docs/DESIGN.md`` (and Sabour, Frosst &
Hinton, "Dynamic Routing Between Capsules", NeurIPS 2017, Procedure 1) line by line and
lets autograd differentiate through every routing iteration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from capsnet.validation import check_routing_inputs


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """Eq. 1: ``squash(s) = |s|^2 / (1 + |s|^2) * s / |s|``, written as ``s * |s| / (1 + |s|^2)``.

    The rewritten form is finite at ``s = 0`` with a zero gradient there. ``torch.linalg.norm``
    alone would give a NaN gradient at zero (d|s|/ds = s/|s|), so the norm is taken through
    a ``where`` that never feeds a zero into the square root's backward.
    """
    sq_norm = (s * s).sum(dim=dim, keepdim=True)
    nonzero = sq_norm > 0
    safe_sq_norm = torch.where(nonzero, sq_norm, torch.ones_like(sq_norm))
    norm = torch.where(nonzero, safe_sq_norm.sqrt(), torch.zeros_like(sq_norm))
    return s * (norm / (1.0 + sq_norm))


def dynamic_routing_reference(
    u: Tensor,
    W: Tensor,
    bias: Tensor | None = None,
    num_iterations: int = 3,
) -> Tensor:
    """Routing-by-agreement from input capsules ``u`` to output capsules ``v``.

    Args:
        u: input capsule poses, ``[B, N_in, D_in]``.
        W: transformation matrices, ``[N_in, N_out, D_out, D_in]``; ``W[i, j]`` maps input
            capsule ``i`` to its prediction for output capsule ``j``.
        bias: optional ``[N_out, D_out]`` added to each output capsule's total input.
        num_iterations: routing iterations ``r >= 1``.

    Returns:
        ``v``: output capsules ``[B, N_out, D_out]``.
    """
    check_routing_inputs(u, W, bias, num_iterations)
    batch, num_in, _ = u.shape
    num_out = W.shape[1]

    # Eq. 2: u_hat[b, i, j, :] = W[i, j] @ u[b, i]
    u_hat = torch.einsum("ijde,bie->bijd", W, u)
    # Routing logits start at zero for every sample (never shared across the batch).
    logits = u.new_zeros(batch, num_in, num_out)
    v = None
    for iteration in range(num_iterations):
        c = torch.softmax(logits, dim=2)  # Eq. 3: softmax over OUTPUT capsules j
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)  # Eq. 2: s_j = sum_i c_ij u_hat_j|i
        if bias is not None:
            s = s + bias
        v = squash(s)  # Eq. 1
        if iteration < num_iterations - 1:
            # Agreement: b_ij += u_hat_j|i . v_j
            logits = logits + (u_hat * v.unsqueeze(1)).sum(dim=-1)
    return v
