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
from capsnet.validation import MAX_ITERATIONS, check_routing_inputs

BACKENDS = ("auto", "fused", "reference")

# ---------------------------------------------------------------------------------------
# Registration (only when the compiled library defined the ops).
# ---------------------------------------------------------------------------------------
def saved_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the forward's saved ``s_saved``: float32 for float16/bfloat16 inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_shapes_like_kernels(u, W, bias, logit_prior, num_iterations) -> None:
    """The kernels' shape checks (csrc/routing_checks.h), for fake and meta tensors."""
    torch._check(u.dim() == 3, lambda: f"capsnet: u must have 3 dimensions [B, N_in, D_in], got shape {tuple(u.shape)}")
    torch._check(
        W.dim() == 4,
        lambda: f"capsnet: W must have 4 dimensions [N_in, N_out, D_out, D_in], got shape {tuple(W.shape)}",
    )
    torch._check(
        W.shape[0] == u.shape[1] and W.shape[3] == u.shape[2],
        lambda: f"capsnet: W must have shape [N_in={u.shape[1]}, N_out, D_out, D_in={u.shape[2]}] to match u "
        f"of shape {tuple(u.shape)}, got W of shape {tuple(W.shape)}",
    )
    torch._check(
        u.shape[1] >= 1 and u.shape[2] >= 1 and W.shape[1] >= 1 and W.shape[2] >= 1,
        lambda: "capsnet: N_in, D_in, N_out and D_out must be at least 1",
    )
    torch._check(
        1 <= num_iterations <= MAX_ITERATIONS,
        lambda: f"capsnet: num_iterations must be between 1 and {MAX_ITERATIONS}, got {num_iterations}",
    )
    for name, t in (("W", W), ("bias", bias), ("logit_prior", logit_prior)):
        if t is not None:
            torch._check(t.dtype == u.dtype, lambda: f"capsnet: {name} must have the dtype of u ({u.dtype}), got {t.dtype}")
    if bias is not None:
        torch._check(
            tuple(bias.shape) == (W.shape[1], W.shape[2]),
            lambda: f"capsnet: bias must have shape [N_out, D_out] = [{W.shape[1]}, {W.shape[2]}], got {tuple(bias.shape)}",
        )
    if logit_prior is not None:
        torch._check(
            tuple(logit_prior.shape) == (u.shape[1], W.shape[1]),
            lambda: f"capsnet: logit_prior must have shape [N_in, N_out] = [{u.shape[1]}, {W.shape[1]}], "
            f"got {tuple(logit_prior.shape)}",
        )


if _extension.has_ops():

    @torch.library.register_fake("capsnet::routing_forward")
    def _routing_forward_fake(u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings):
        _check_shapes_like_kernels(u, W, bias, logit_prior, num_iterations)
        batch, num_in = u.shape[0], u.shape[1]
        num_out, dim_out = W.shape[1], W.shape[2]
        v = u.new_empty(batch, num_out, dim_out)
        s_saved = u.new_empty(batch, num_iterations, num_out, dim_out, dtype=saved_state_dtype(u.dtype))
        couplings = u.new_empty(batch, num_in, num_out) if return_couplings else u.new_empty(0)
        return v, s_saved, couplings

    @torch.library.register_fake("capsnet::routing_backward")
    def _routing_backward_fake(grad_v, u, W, logit_prior, s_saved, leaky, detach_routing):
        torch._check(
            s_saved.dim() == 4,
            lambda: f"capsnet: s_saved must have 4 dimensions [B, r, N_out, D_out], got shape {tuple(s_saved.shape)}",
        )
        _check_shapes_like_kernels(u, W, None, logit_prior, s_saved.shape[1])
        batch, num_out, dim_out = u.shape[0], W.shape[1], W.shape[2]
        torch._check(
            tuple(s_saved.shape) == (batch, s_saved.shape[1], num_out, dim_out),
            lambda: f"capsnet: s_saved must have shape [B={batch}, r, N_out={num_out}, D_out={dim_out}], "
            f"got {tuple(s_saved.shape)}",
        )
        torch._check(
            s_saved.dtype == saved_state_dtype(u.dtype),
            lambda: f"capsnet: s_saved must have dtype {saved_state_dtype(u.dtype)}, got {s_saved.dtype}",
        )
        torch._check(
            tuple(grad_v.shape) == (batch, num_out, dim_out),
            lambda: f"capsnet: grad_v must have shape [B, N_out, D_out] = [{batch}, {num_out}, {dim_out}], "
            f"got {tuple(grad_v.shape)}",
        )
        grad_prior = (
            u.new_empty(u.shape[1], num_out) if logit_prior is not None and not detach_routing else u.new_empty(0)
        )
        return (
            torch.empty_like(u, memory_format=torch.contiguous_format),
            torch.empty_like(W, memory_format=torch.contiguous_format),
            u.new_empty(num_out, dim_out),
            grad_prior,
        )

    def _setup_context(ctx, inputs, output):
        u, W, bias, logit_prior, _num_iterations, leaky, detach_routing, _return_couplings = inputs
        _v, s_saved, couplings = output
        ctx.mark_non_differentiable(s_saved, couplings)
        ctx.has_bias = bias is not None
        ctx.has_prior = logit_prior is not None
        ctx.leaky = leaky
        ctx.detach_routing = detach_routing
        ctx.save_for_backward(u, W, logit_prior, s_saved)

    def _routing_forward_backward(ctx, grad_v, _grad_s_saved, _grad_couplings):
        u, W, logit_prior, s_saved = ctx.saved_tensors
        grad_u, grad_W, grad_bias, grad_prior = torch.ops.capsnet.routing_backward(
            grad_v.contiguous(), u, W, logit_prior, s_saved, ctx.leaky, ctx.detach_routing
        )
        return (
            grad_u,
            grad_W,
            grad_bias if ctx.has_bias else None,
            grad_prior if ctx.has_prior and not ctx.detach_routing else None,
            None,
            None,
            None,
            None,
        )

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


_warned_devices: set[int | None] = set()


def _gpu_is_covered(backend: str, device: torch.device) -> bool:
    """Whether the CUDA kernels were compiled for the GPU of `device` (or its PTX is). If not:
    "fused" raises, "auto" warns once per GPU and returns False (use the reference)."""
    problem = _extension.cuda_device_problem(device)
    if problem is None:
        return True
    if backend == "fused":
        raise RuntimeError(f"capsnet: backend='fused' is unavailable: {problem}")
    if device.index not in _warned_devices:
        _warned_devices.add(device.index)
        warnings.warn(
            f"capsnet: no fused routing kernel for this GPU: {problem}. Using the pure-PyTorch reference, "
            "which is much slower; pass backend='reference' to silence this warning.",
            stacklevel=3,
        )
    return False


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def dynamic_routing(
    u: Tensor,
    W: Tensor,
    bias: Tensor | None = None,
    num_iterations: int = 3,
    *,
    leaky: bool = False,
    detach_routing: bool = False,
    logit_prior: Tensor | None = None,
    return_couplings: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Dynamic routing between capsules (Sabour et al., 2017, Procedure 1).

    Args:
        u: input capsule poses ``[B, N_in, D_in]``.
        W: transformation matrices ``[N_in, N_out, D_out, D_in]``.
        bias: optional ``[N_out, D_out]`` added to each output capsule's total input.
        num_iterations: routing iterations ``r >= 1`` (the paper uses 3).
        leaky: leaky routing (Sec. 7, "none-of-the-above"): each input capsule's softmax has
            an extra logit fixed at 0 whose coupling is dropped,
            ``c_ij = exp(b_ij) / (1 + sum_k exp(b_ik))``.
        detach_routing: the couplings of every iteration are computed as usual but treated
            as constants by autograd: gradients reach ``u``, ``W`` and ``bias`` only through
            the last iteration's weighted sum and squash ("stop-gradient" routing). Much
            cheaper backward; not the true gradient.
        logit_prior: optional ``[N_in, N_out]``, the initial routing logits ``b_ij`` of every
            sample (zeros when None); it receives a gradient when it requires one (except
            under ``detach_routing``, where it is a constant).
        return_couplings: also return the last iteration's couplings ``c [B, N_in, N_out]``
            (not differentiable: they are detached).
        backend: ``"fused"`` (compiled kernel, error if unavailable), ``"reference"``
            (pure PyTorch) or ``"auto"`` (fused where a kernel exists for the input's device
            and dtype, otherwise the reference with a one-time warning).

    Returns:
        Output capsules ``v`` of shape ``[B, N_out, D_out]`` in the dtype of ``u``, or
        ``(v, c)`` with ``return_couplings``. Gradients flow to ``u``, ``W``, ``bias`` and
        ``logit_prior`` through every routing iteration (unless ``detach_routing``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, flag in (("leaky", leaky), ("detach_routing", detach_routing), ("return_couplings", return_couplings)):
        _check_flag(name, flag)
    num_iterations = check_routing_inputs(u, W, bias, num_iterations, logit_prior=logit_prior)
    options = dict(
        leaky=leaky, detach_routing=detach_routing, logit_prior=logit_prior, return_couplings=return_couplings
    )
    device_type = u.device.type
    if backend == "reference":
        return dynamic_routing_reference(u, W, bias, num_iterations, **options)
    # Under autocast the op receives float32 (capsnet/autocast.py): choose the kernel for that.
    kernel_dtype = dtype_seen_by_op(u)
    if backend == "fused":
        _extension.require_kernel(device_type, kernel_dtype)
    elif not _extension.has_kernel(device_type, kernel_dtype):
        _warn_fallback_once(device_type, kernel_dtype)
        return dynamic_routing_reference(u, W, bias, num_iterations, **options)
    if device_type == "cuda" and not _gpu_is_covered(backend, u.device):
        return dynamic_routing_reference(u, W, bias, num_iterations, **options)
    v, _s_saved, couplings = torch.ops.capsnet.routing_forward(
        u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings
    )
    return (v, couplings) if return_couplings else v
