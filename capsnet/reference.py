"""Pure-PyTorch dynamic routing: the test oracle and the fallback backend.

Written for clarity, not speed: it follows ``docs/DESIGN.md`` (and Sabour, Frosst &
Hinton, "Dynamic Routing Between Capsules", NeurIPS 2017, Procedure 1) line by line and
lets autograd differentiate through every routing iteration (any number of times).
"""

from __future__ import annotations

import torch
from torch import Tensor

from capsnet.functional import squash
from capsnet.validation import check_routing_inputs

__all__ = ["coupling_softmax", "dynamic_routing_reference", "squash"]


def coupling_softmax(logits: Tensor, leaky: bool = False) -> Tensor:
    """Eq. 3: couplings ``c[..., i, j] = softmax_j(logits[..., i, :])``, over the OUTPUT capsules.

    ``leaky=True`` (Sec. 7, "none-of-the-above"): the softmax includes an extra logit fixed at
    0 whose coupling is dropped, ``c_ij = exp(b_ij) / (1 + sum_k exp(b_ik))``.
    """
    if not leaky:
        return torch.softmax(logits, dim=-1)
    fixed = logits.new_zeros(*logits.shape[:-1], 1)
    return torch.softmax(torch.cat([logits, fixed], dim=-1), dim=-1)[..., :-1]


def dynamic_routing_reference(
    u: Tensor,
    W: Tensor,
    bias: Tensor | None = None,
    num_iterations: int = 3,
    *,
    leaky: bool = False,
    detach_routing: bool = False,
    logit_prior: Tensor | None = None,
    return_couplings: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Routing-by-agreement from input capsules ``u`` to output capsules ``v``.

    Args:
        u: input capsule poses, ``[B, N_in, D_in]``.
        W: transformation matrices, ``[N_in, N_out, D_out, D_in]``; ``W[i, j]`` maps input
            capsule ``i`` to its prediction for output capsule ``j``.
        bias: optional ``[N_out, D_out]`` added to each output capsule's total input.
        num_iterations: routing iterations ``r >= 1`` (an int, or a NumPy integer).
        leaky: leaky routing (see :func:`coupling_softmax`).
        detach_routing: the couplings of every iteration are computed as usual but are
            constants for autograd (as if computed from detached predictions, bias and prior);
            gradients reach ``u``, ``W`` and ``bias`` only through the last iteration's
            weighted sum and squash.
        logit_prior: optional ``[N_in, N_out]``, the initial logits ``b_ij`` of every sample
            (zeros when None).
        return_couplings: also return the last iteration's couplings ``c [B, N_in, N_out]``,
            detached (they are for inspection, not differentiable).

    Returns:
        ``v``: output capsules ``[B, N_out, D_out]``, or ``(v, c)`` with ``return_couplings``.
    """
    num_iterations = check_routing_inputs(u, W, bias, num_iterations, logit_prior=logit_prior)
    batch, num_in, _ = u.shape
    num_out = W.shape[1]

    # Eq. 2: u_hat[b, i, j, :] = W[i, j] @ u[b, i]
    u_hat = torch.einsum("ijde,bie->bijd", W, u)
    # What the routing (the couplings) is computed from; detached for detach_routing.
    route_u_hat, route_bias, route_prior = u_hat, bias, logit_prior
    if detach_routing:
        route_u_hat = u_hat.detach()
        route_bias = None if bias is None else bias.detach()
        route_prior = None if logit_prior is None else logit_prior.detach()
    # Routing logits start at the prior (zeros by default) for every sample: never shared
    # across the batch or carried over between calls.
    if route_prior is None:
        logits = u.new_zeros(batch, num_in, num_out)
    else:
        logits = route_prior.expand(batch, num_in, num_out)
    for iteration in range(num_iterations):
        c = coupling_softmax(logits, leaky)  # Eq. 3, over OUTPUT capsules j
        last = iteration == num_iterations - 1
        if last:
            # The output: from the predictions and bias themselves (c is a constant under
            # detach_routing, since it was computed from detached tensors).
            s = (c.unsqueeze(-1) * u_hat).sum(dim=1)  # Eq. 2: s_j = sum_i c_ij u_hat_j|i
            if bias is not None:
                s = s + bias
        else:
            s = (c.unsqueeze(-1) * route_u_hat).sum(dim=1)
            if route_bias is not None:
                s = s + route_bias
        v = squash(s)  # Eq. 1
        if not last:
            # Agreement: b_ij += u_hat_j|i . v_j
            logits = logits + (route_u_hat * v.unsqueeze(1)).sum(dim=-1)
    if return_couplings:
        return v, c.detach()
    return v
