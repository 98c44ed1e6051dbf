"""A fully connected capsule layer with dynamic routing, for any model.

Paper references are to Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules"
(NeurIPS 2017).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from capsnet.ops import BACKENDS, dynamic_routing


def default_weight_std(num_in: int, dim_in: int, num_out: int, dim_out: int, leaky: bool = False) -> float:
    """The standard deviation of :class:`DynamicRouting`'s default initialisation of ``W``.

    Chosen so that, for inputs with independent unit-variance components, the first
    iteration's total input ``s_j = sum_i c_ij W_ij u_i`` has ``E|s_j|^2 = 1``. Then
    ``|s_j| ~ 1`` and squash (Eq. 1) starts in the middle of its range (``|v| ~ 1/2``), where
    the lengths that capsule losses read respond to their input (``d|v|/d|s| = 1/2`` at
    ``|s| = 1``). With zero initial logits every coupling is ``c0 = 1/N_out`` (``1/(N_out + 1)``
    when leaky), and the ``N_in * D_in`` products in each component of ``s_j`` are uncorrelated,
    so ``E|s_j|^2 = D_out * N_in * D_in * c0^2 * std^2``, which gives

        std = 1 / (c0 * sqrt(N_in * D_in * D_out)).

    Initialising the predictions ``u_hat`` to unit variance instead (``std = 1/sqrt(D_in)``,
    the usual fan-in rule) would make ``|s_j| ~ sqrt(N_in * D_out) * c0`` — about 14 for
    CapsNet's 1152 -> 10 x 16 routing — where squash is saturated: every output has length
    ~1 and the gradient of its length is ~2/|s|^3. For inputs whose components have standard
    deviation ``sigma`` (squashed capsules have ``sigma < 1/sqrt(D_in)``), ``|s_j|`` starts
    near ``sigma``; pass ``weight_std`` scaled by ``1/sigma`` to compensate.
    """
    first_coupling = 1.0 / (num_out + (1 if leaky else 0))
    return 1.0 / (first_coupling * math.sqrt(num_in * dim_in * dim_out))


class DynamicRouting(nn.Module):
    """Routes ``N_in`` input capsules of ``D_in`` components to ``N_out`` output capsules of
    ``D_out`` components by agreement (Sec. 2, Procedure 1), with :func:`capsnet.dynamic_routing`.

    Parameters:
        weight: ``W [N_in, N_out, D_out, D_in]``, one transformation matrix per (input, output)
            pair (Eq. 2), initialised ``Normal(0, weight_std)`` (see :func:`default_weight_std`).
        bias: ``[N_out, D_out]`` added to each output capsule's total input (``bias=True``;
            the official implementation has one), initialised to zero.
        logit_prior: ``[N_in, N_out]``, the initial routing logits, learned (``learn_prior=True``;
            "the log priors can be learned discriminatively", Sec. 2), initialised to zero, the
            paper's uniform start.

    Args:
        num_in, dim_in, num_out, dim_out: the capsule counts and sizes.
        num_iterations: routing iterations (the paper uses 3).
        bias, learn_prior: create the parameters above.
        leaky: leaky routing (Sec. 7): each input capsule may send part of its vote to an
            extra "none of the above" output that is dropped.
        detach_routing: couplings are constants for autograd (cheaper backward, not the true
            gradient; see :func:`capsnet.dynamic_routing`).
        backend: ``"auto"``, ``"fused"`` or ``"reference"`` (see :func:`capsnet.dynamic_routing`).
        weight_std: the initial standard deviation of ``weight``; default
            :func:`default_weight_std`.

    ``forward(u, return_couplings=False)``: ``u [B, N_in, D_in]`` -> ``v [B, N_out, D_out]``,
    or ``(v, c)`` with the last iteration's couplings ``c [B, N_in, N_out]`` (detached).
    """

    def __init__(
        self,
        num_in: int,
        dim_in: int,
        num_out: int,
        dim_out: int,
        num_iterations: int = 3,
        *,
        bias: bool = False,
        leaky: bool = False,
        detach_routing: bool = False,
        learn_prior: bool = False,
        backend: str = "auto",
        weight_std: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_in", num_in),
            ("dim_in", dim_in),
            ("num_out", num_out),
            ("dim_out", dim_out),
            ("num_iterations", num_iterations),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("bias", bias), ("leaky", leaky), ("detach_routing", detach_routing), ("learn_prior", learn_prior)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if weight_std is None:
            weight_std = default_weight_std(num_in, dim_in, num_out, dim_out, leaky)
        elif not weight_std > 0:
            raise ValueError(f"weight_std must be positive, got {weight_std!r}")
        self.num_iterations = num_iterations
        self.leaky = leaky
        self.detach_routing = detach_routing
        self.backend = backend
        self.weight_std = weight_std
        self.weight = nn.Parameter(torch.empty(num_in, num_out, dim_out, dim_in))
        self.bias = nn.Parameter(torch.empty(num_out, dim_out)) if bias else None
        self.logit_prior = nn.Parameter(torch.empty(num_in, num_out)) if learn_prior else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.weight_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.logit_prior is not None:
            nn.init.zeros_(self.logit_prior)

    def extra_repr(self) -> str:
        num_in, num_out, dim_out, dim_in = self.weight.shape
        return (
            f"{num_in}x{dim_in}D -> {num_out}x{dim_out}D, num_iterations={self.num_iterations}, "
            f"bias={self.bias is not None}, leaky={self.leaky}, detach_routing={self.detach_routing}, "
            f"learn_prior={self.logit_prior is not None}, backend={self.backend!r}, weight_std={self.weight_std:.4g}"
        )

    def forward(self, u: Tensor, return_couplings: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``u [B, N_in, D_in]`` -> ``v [B, N_out, D_out]`` (and the couplings, on request)."""
        return dynamic_routing(
            u,
            self.weight,
            self.bias,
            self.num_iterations,
            leaky=self.leaky,
            detach_routing=self.detach_routing,
            logit_prior=self.logit_prior,
            return_couplings=return_couplings,
            backend=self.backend,
        )
