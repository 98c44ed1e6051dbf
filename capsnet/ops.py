"""The public dynamic-routing op: backend choice, fake (meta) and autograd registration.

``torch.ops.capsnet.routing_forward`` / ``routing_backward`` are defined in C++
(``csrc/routing.cpp``) with kernels per device. This module adds what the dispatcher
needs from Python so that the op works under autograd, ``torch.compile`` and
``torch.library.opcheck``, and picks between the fused op and the pure-PyTorch
reference.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from capsnet import _extension
from capsnet.autocast import dtype_seen_by_op  # importing it registers the autocast rule
from capsnet.reference import dynamic_routing_reference
from capsnet.validation import check_routing_inputs

BACKENDS = ("auto", "fused", "reference")

# ---------------------------------------------------------------------------------------
# Registration (only when the compiled library defined the ops).
# ---------------------------------------------------------------------------------------
if _extension.has_ops():

    @torch.library.register_fake("capsnet::routing_forward")
    def _routing_forward_fake(u, W, bias, num_iterations):
        torch._check(u.dim() == 3, lambda: f"u must be [B, N_in, D_in], got {u.shape}")
        torch._check(W.dim() == 4, lambda: f"W must be [N_in, N_out, D_out, D_in], got {W.shape}")
        torch._check(num_iterations >= 1, lambda: "num_iterations must be at least 1")
        batch, num_in = u.shape[0], u.shape[1]
        num_out, dim_out = W.shape[1], W.shape[2]
        v = u.new_empty(batch, num_out, dim_out)
        s_saved = u.new_empty(batch, num_iterations, num_out, dim_out)
        couplings = u.new_empty(batch, num_iterations, num_out, num_in)
        return v, s_saved, couplings

    @torch.library.register_fake("capsnet::routing_backward")
    def _routing_backward_fake(grad_v, u, W, s_saved, couplings):
        torch._check(s_saved.dim() == 4, lambda: f"s_saved must be 4-D, got {s_saved.shape}")
        return (
            torch.empty_like(u, memory_format=torch.contiguous_format),
            torch.empty_like(W, memory_format=torch.contiguous_format),
            W.new_empty(W.shape[1], W.shape[2]),
        )

    def _setup_context(ctx, inputs, output):
        u, W, bias, _num_iterations = inputs
        _v, s_saved, couplings = output
        ctx.mark_non_differentiable(s_saved, couplings)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(u, W, s_saved, couplings)

    def _routing_forward_backward(ctx, grad_v, _grad_s_saved, _grad_couplings):
        u, W, s_saved, couplings = ctx.saved_tensors
        grad_u, grad_W, grad_bias = torch.ops.capsnet.routing_backward(
            grad_v.contiguous(), u, W, s_saved, couplings
        )
        return grad_u, grad_W, (grad_bias if ctx.has_bias else None), None

    torch.library.register_autograd(
        "capsnet::routing_forward", _routing_forward_backward, setup_context=_setup_context
    )

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "capsnet: double backward (gradients of gradients) through the fused routing op "
            "is not supported; use dynamic_routing(..., backend='reference') for "
            "higher-order derivatives"
        )

    def _setup_backward_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(
        "capsnet::routing_backward", _no_double_backward, setup_context=_setup_backward_context
    )


_warned_fallbacks: set[tuple[str, torch.dtype]] = set()


def _warn_fallback_once(device_type: str, dtype: torch.dtype) -> None:
    key = (device_type, dtype)
    if key in _warned_fallbacks:
        return
    _warned_fallbacks.add(key)
    warnings.warn(
        f"capsnet: no fused routing kernel for device '{device_type}' and dtype {dtype} "
        f"({_extension.missing_reason(device_type, dtype)}); using the pure-PyTorch "
        "reference, which is much slower and uses much more memory. "
        "Pass backend='reference' to silence this warning.",
        stacklevel=3,
    )


def dynamic_routing(
    u: Tensor,
    W: Tensor,
    bias: Tensor | None = None,
    num_iterations: int = 3,
    *,
    backend: str = "auto",
) -> Tensor:
    """Dynamic routing between capsules (Sabour et al., 2017, Procedure 1).

    Args:
        u: input capsule poses ``[B, N_in, D_in]``.
        W: transformation matrices ``[N_in, N_out, D_out, D_in]``.
        bias: optional ``[N_out, D_out]`` added to each output capsule's total input.
        num_iterations: routing iterations ``r >= 1`` (the paper uses 3).
        backend: ``"fused"`` (compiled kernel, error if unavailable), ``"reference"``
            (pure PyTorch) or ``"auto"`` (fused where a kernel exists for the input's device
            and dtype, otherwise the reference with a one-time warning).

    Returns:
        Output capsules ``v`` of shape ``[B, N_out, D_out]``. Gradients flow to ``u``, ``W``
        and ``bias`` through every routing iteration.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_routing_inputs(u, W, bias, num_iterations)
    device_type = u.device.type
    if backend == "reference":
        return dynamic_routing_reference(u, W, bias, num_iterations)
    # Under autocast the op receives float32 (capsnet/autocast.py): choose the kernel for that.
    kernel_dtype = dtype_seen_by_op(u)
    if backend == "fused":
        _extension.require_kernel(device_type, kernel_dtype)
    elif not _extension.has_kernel(device_type, kernel_dtype):
        _warn_fallback_once(device_type, kernel_dtype)
        return dynamic_routing_reference(u, W, bias, num_iterations)
    v, _s_saved, _couplings = torch.ops.capsnet.routing_forward(u, W, bias, num_iterations)
    return v
