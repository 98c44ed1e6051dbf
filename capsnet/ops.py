"""The public dynamic-routing op: backend choice, and what the dispatcher needs from Python.

``torch.ops.capsnet.routing_forward`` / ``routing_backward`` are defined in C++
(``csrc/routing.cpp``) with kernels per device. This module registers, when the compiled
library is loaded:

* fake (meta) kernels that check shapes like the C++ kernels (``torch.compile``, ``opcheck``,
  the meta device);
* autograd: the backward op, for every iteration; a second derivative raises a clear error;
  forward-mode AD raises a clear error naming the reference backend (the fused kernels have
  no forward-mode formula, and silently zero tangents are the alternative);
* vmap rules (``torch.vmap``, and with them ``torch.func.jacrev`` and per-sample gradients);
* the autocast policy (``capsnet/autocast.py``).

:func:`dynamic_routing` validates its arguments, applies the autocast policy and runs the
fused op or the pure-PyTorch reference. In eager mode it calls the op through an
``autograd.Function`` at the Python level, because ``torch.func.grad``/``jacrev``/
``vmap(grad)`` can only differentiate a Python-level ``autograd.Function``, not a custom op's
autograd kernel: :class:`_FusedRouting` under the torch.func transforms, and the leaner
:class:`_EagerFusedRouting` otherwise (a training step's usual path: on a GPU at small
batches, host work between launches is more than half of a step). Under ``torch.compile``
it calls the op itself, whose registered autograd AOTAutograd traces. All use the same
formula below.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from capsnet import _extension
from capsnet.autocast import cast_for_routing, dtype_seen_by_op, routing_precision
from capsnet.reference import dynamic_routing_reference
from capsnet.validation import MAX_ITERATIONS, check_routing_inputs

BACKENDS = ("auto", "fused", "reference")

FUNCTORCH_DIRECT_CALL_ERROR = (
    "capsnet: torch.func transforms (grad, jacrev, vmap of a gradient) cannot differentiate a "
    "direct call of torch.ops.capsnet.routing_forward; call capsnet.dynamic_routing, whose fused "
    "backend supports them, or use dynamic_routing(..., backend='reference')"
)
FORWARD_AD_ERROR = (
    "capsnet: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) "
    "is not supported by the fused routing op, which has no forward-mode formula; use "
    "dynamic_routing(..., backend='reference') for forward-mode derivatives"
)
DOUBLE_BACKWARD_ERROR = (
    "capsnet: double backward (gradients of gradients, e.g. torch.func.hessian) through the "
    "fused routing op is not supported; use dynamic_routing(..., backend='reference') for "
    "higher-order derivatives"
)


def saved_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the forward's saved ``s_saved``: float32 for float16/bfloat16 inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------------------
# Fake kernels: the C++ kernels' checks (csrc/routing_checks.h), for fake and meta tensors.
# ---------------------------------------------------------------------------------------
def _check_placement(name: str, t: Tensor, u: Tensor) -> None:
    torch._check(t.dtype == u.dtype, lambda: f"capsnet: {name} must have the dtype of u ({u.dtype}), got {t.dtype}")
    torch._check(t.device == u.device, lambda: f"capsnet: {name} must be on the device of u ({u.device}), got {t.device}")


def _check_forward_like_kernels(u, W, bias, logit_prior, num_iterations) -> None:
    torch._check(u.dim() == 3, lambda: f"capsnet: u must have 3 dimensions [B, N_in, D_in], got shape {tuple(u.shape)}")
    torch._check(
        W.dim() == 4,
        lambda: f"capsnet: W must have 4 dimensions [N_in, N_out, D_out, D_in], got shape {tuple(W.shape)}",
    )
    torch._check(
        u.dtype in _extension.FUSED_DTYPES,
        lambda: f"capsnet: u must be float16, bfloat16, float32 or float64, got {u.dtype}",
    )
    _check_placement("W", W, u)
    torch._check(
        W.shape[0] == u.shape[1] and W.shape[3] == u.shape[2],
        lambda: f"capsnet: W must have shape [N_in={u.shape[1]}, N_out, D_out, D_in={u.shape[2]}] to match u "
        f"of shape {tuple(u.shape)}, got W of shape {tuple(W.shape)}",
    )
    torch._check(
        u.shape[1] >= 1 and u.shape[2] >= 1 and W.shape[1] >= 1 and W.shape[2] >= 1,
        lambda: f"capsnet: N_in, D_in, N_out and D_out must be at least 1, got u of shape {tuple(u.shape)} "
        f"and W of shape {tuple(W.shape)} (only the batch dimension B may be 0)",
    )
    torch._check(
        1 <= num_iterations <= MAX_ITERATIONS,
        lambda: f"capsnet: num_iterations must be between 1 and {MAX_ITERATIONS}, got {num_iterations}",
    )
    if bias is not None:
        _check_placement("bias", bias, u)
        torch._check(
            tuple(bias.shape) == (W.shape[1], W.shape[2]),
            lambda: f"capsnet: bias must have shape [N_out, D_out] = [{W.shape[1]}, {W.shape[2]}] to match W of "
            f"shape {tuple(W.shape)}, got bias of shape {tuple(bias.shape)}",
        )
    if logit_prior is not None:
        _check_placement("logit_prior", logit_prior, u)
        torch._check(
            tuple(logit_prior.shape) == (u.shape[1], W.shape[1]),
            lambda: f"capsnet: logit_prior must have shape [N_in, N_out] = [{u.shape[1]}, {W.shape[1]}], "
            f"got logit_prior of shape {tuple(logit_prior.shape)}",
        )


def _check_backward_like_kernels(grad_v, u, W, logit_prior, s_saved) -> None:
    torch._check(
        s_saved.dim() == 4,
        lambda: f"capsnet: s_saved must have 4 dimensions [B, r, N_out, D_out], got shape {tuple(s_saved.shape)}",
    )
    _check_forward_like_kernels(u, W, None, logit_prior, s_saved.shape[1])
    batch, num_out, dim_out = u.shape[0], W.shape[1], W.shape[2]
    torch._check(
        s_saved.dtype == saved_state_dtype(u.dtype),
        lambda: f"capsnet: s_saved must have dtype {saved_state_dtype(u.dtype)} for u of dtype {u.dtype}, "
        f"got {s_saved.dtype}",
    )
    torch._check(
        s_saved.device == u.device, lambda: f"capsnet: s_saved must be on the device of u ({u.device}), got {s_saved.device}"
    )
    _check_placement("grad_v", grad_v, u)
    torch._check(
        s_saved.shape[0] == batch and s_saved.shape[2] == num_out and s_saved.shape[3] == dim_out,
        lambda: f"capsnet: s_saved must have shape [B={batch}, r, N_out={num_out}, D_out={dim_out}], "
        f"got {tuple(s_saved.shape)}",
    )
    torch._check(
        tuple(grad_v.shape) == (batch, num_out, dim_out),
        lambda: f"capsnet: grad_v must have shape [B, N_out, D_out] = [{batch}, {num_out}, {dim_out}], "
        f"got {tuple(grad_v.shape)}",
    )


def _routing_forward_fake(u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings):
    _check_forward_like_kernels(u, W, bias, logit_prior, num_iterations)
    batch, num_in = u.shape[0], u.shape[1]
    num_out, dim_out = W.shape[1], W.shape[2]
    v = u.new_empty(batch, num_out, dim_out)
    s_saved = u.new_empty(batch, num_iterations, num_out, dim_out, dtype=saved_state_dtype(u.dtype))
    couplings = u.new_empty(batch, num_in, num_out) if return_couplings else u.new_empty(0)
    return v, s_saved, couplings


def _routing_backward_fake(grad_v, u, W, logit_prior, s_saved, leaky, detach_routing):
    _check_backward_like_kernels(grad_v, u, W, logit_prior, s_saved)
    num_out, dim_out = W.shape[1], W.shape[2]
    grad_prior = u.new_empty(u.shape[1], num_out) if logit_prior is not None and not detach_routing else u.new_empty(0)
    return (
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(W, memory_format=torch.contiguous_format),
        u.new_empty(num_out, dim_out),
        grad_prior,
    )


# ---------------------------------------------------------------------------------------
# Autograd. One formula (setup_context + the backward op), used by the op's registration and
# by _FusedRouting.
# ---------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    u, W, bias, logit_prior, _num_iterations, leaky, detach_routing, _return_couplings = inputs
    _v, s_saved, couplings = output
    ctx.mark_non_differentiable(s_saved, couplings)
    ctx.has_bias = bias is not None
    ctx.has_prior = logit_prior is not None
    ctx.leaky = leaky
    ctx.detach_routing = detach_routing
    ctx.save_for_backward(u, W, logit_prior, s_saved)


def _input_gradients(ctx, grad_u, grad_W, grad_bias, grad_prior):
    """The backward op's outputs as gradients of the forward op's eight inputs."""
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


# The dispatcher's guard that skips the Autograd keys (torch's own Python autograd kernels use
# it); None in a torch without it, where the ops are called through their autograd kernels.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _kernel_call(op, *args):
    """op's CPU or CUDA kernel itself, below its Autograd kernel: for callers that do the
    autograd themselves (an autograd.Function's forward, or a backward that records nothing).
    The Autograd kernels are Python (registered in this module and by
    torch.library.register_autograd): about 40 us a call on this project's CI host."""
    if _BELOW_AUTOGRAD is None:
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def _backward_args(ctx, grad_v):
    """The backward op's arguments from what _setup_context saved."""
    u, W, logit_prior, s_saved = ctx.saved_tensors
    return (grad_v.contiguous(), u, W, logit_prior, s_saved, ctx.leaky, ctx.detach_routing)


def _routing_forward_backward(ctx, grad_v, _grad_s_saved, _grad_couplings):
    grads = torch.ops.capsnet.routing_backward(*_backward_args(ctx, grad_v))
    return _input_gradients(ctx, *grads)


def _has_forward_tangent(tensors) -> bool:
    # Forward AD (torch.autograd.forward_ad and torch.func.jvp alike) attaches a tangent at the
    # current dual level.
    return any(
        t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )


class _RoutingBackward(torch.autograd.Function):
    """The backward op as a Python-level Function, so that differentiating it again raises
    DOUBLE_BACKWARD_ERROR under torch.func transforms too (not only under torch.autograd)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_v, u, W, logit_prior, s_saved, leaky, detach_routing):
        return torch.ops.capsnet.routing_backward(grad_v, u, W, logit_prior, s_saved, leaky, detach_routing)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


class _FusedRouting(torch.autograd.Function):
    """The fused op for eager calls of :func:`dynamic_routing`: works under torch.autograd and
    the torch.func transforms grad, jacrev, vmap and their compositions."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings):
        return torch.ops.capsnet.routing_forward(
            u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings
        )

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_v, _grad_s_saved, _grad_couplings):
        return _input_gradients(ctx, *_RoutingBackward.apply(*_backward_args(ctx, grad_v)))

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(FORWARD_AD_ERROR)


class _EagerFusedRouting(torch.autograd.Function):
    """_FusedRouting for calls outside the torch.func transforms: the same formula without
    the costs that only those transforms need. A Function with setup_context binds its
    arguments to forward's signature on every apply (inspect.signature, about 40 us on this
    project's CI host), and each op call through its Python Autograd kernel costs as much
    again; this one calls the kernels below autograd. A backward that is itself recorded
    (create_graph=True) goes through _RoutingBackward, whose derivative raises
    DOUBLE_BACKWARD_ERROR."""

    @staticmethod
    def forward(ctx, u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings):
        inputs = (u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings)
        output = _kernel_call(torch.ops.capsnet.routing_forward.default, *inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_v, _grad_s_saved, _grad_couplings):
        args = _backward_args(ctx, grad_v)
        if torch.is_grad_enabled():
            grads = _RoutingBackward.apply(*args)
        else:
            grads = _kernel_call(torch.ops.capsnet.routing_backward.default, *args)
        return _input_gradients(ctx, *grads)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _register_autograd() -> None:
    """Autograd of the forward op, for direct calls and for torch.compile.

    torch.library.register_autograd's kernel skips autograd when no input requires grad, so
    under forward AD it would return outputs without tangents: zero derivatives, silently.
    The kernel registered here checks for tangents first, then runs the kernel that
    register_autograd would have registered (torch._library.autograd.make_autograd_impl is
    what it calls).
    """
    try:
        from torch._library.autograd import Info, make_autograd_impl
    except ImportError:  # another torch: the public registration, without the tangent check
        torch.library.register_autograd(
            "capsnet::routing_forward", _routing_forward_backward, setup_context=_setup_context
        )
        return
    autograd_kernel = make_autograd_impl(
        torch.ops.capsnet.routing_forward.default, Info(_routing_forward_backward, _setup_context)
    )

    def routing_forward_autograd(keyset, u, W, bias, logit_prior, *options):
        tensors = (u, W, bias, logit_prior)
        if _has_forward_tangent(tensors):
            raise RuntimeError(FORWARD_AD_ERROR)
        if torch._C._are_functorch_transforms_active() and _needs_autograd(tensors):
            # An autograd.Function applied inside a dispatcher kernel is invisible to
            # torch.func (its error would not say what to do): _FusedRouting is the way.
            raise RuntimeError(FUNCTORCH_DIRECT_CALL_ERROR)
        return autograd_kernel(keyset, *tensors, *options)

    _LIBRARY.impl("routing_forward", routing_forward_autograd, "Autograd", with_keyset=True)


# ---------------------------------------------------------------------------------------
# vmap rules.
# ---------------------------------------------------------------------------------------
def _select(t: Tensor | None, dim: int | None, index: int) -> Tensor | None:
    return t if t is None or dim is None else t.select(dim, index)


def _stack_outputs(per_element, flags_unbatched):
    """Stacks the outputs of one op call per vmapped element (dim 0); an output that is the
    empty placeholder in every call stays unbatched."""
    outputs, out_dims = [], []
    for position, outs in enumerate(zip(*per_element)):
        if flags_unbatched[position]:
            outputs.append(outs[0])
            out_dims.append(None)
        else:
            outputs.append(torch.stack(outs))
            out_dims.append(0)
    return tuple(outputs), tuple(out_dims)


def _routing_forward_vmap(info, in_dims, u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings):
    u_dim, w_dim, bias_dim, prior_dim = in_dims[:4]
    options = (num_iterations, leaky, detach_routing, return_couplings)
    if w_dim is None and bias_dim is None and prior_dim is None:
        # Only u is batched: samples are routed independently, so the vmapped dimension joins
        # the batch dimension and one call does it all.
        u_all = u.movedim(u_dim, 0)
        outer, batch = u_all.shape[0], u_all.shape[1]
        v, s_saved, couplings = torch.ops.capsnet.routing_forward(
            u_all.reshape(outer * batch, *u_all.shape[2:]), W, bias, logit_prior, *options
        )
        v = v.view(outer, batch, *v.shape[1:])
        s_saved = s_saved.view(outer, batch, *s_saved.shape[1:])
        if return_couplings:
            return (v, s_saved, couplings.view(outer, batch, *couplings.shape[1:])), (0, 0, 0)
        return (v, s_saved, couplings), (0, 0, None)
    per_element = [
        torch.ops.capsnet.routing_forward(
            *(_select(t, d, k) for t, d in zip((u, W, bias, logit_prior), in_dims[:4])), *options
        )
        for k in range(info.batch_size)
    ]
    return _stack_outputs(per_element, (False, False, not return_couplings))


def _routing_backward_vmap(info, in_dims, grad_v, u, W, logit_prior, s_saved, leaky, detach_routing):
    # The backward sums grad_W, grad_bias and grad_prior over the batch, so vmapped elements
    # cannot share a call: one call per element.
    per_element = [
        torch.ops.capsnet.routing_backward(
            *(_select(t, d, k) for t, d in zip((grad_v, u, W, logit_prior, s_saved), in_dims[:5])),
            leaky,
            detach_routing,
        )
        for k in range(info.batch_size)
    ]
    return _stack_outputs(per_element, (False, False, False, logit_prior is None or detach_routing))


if _extension.has_ops():
    _LIBRARY = torch.library.Library("capsnet", "FRAGMENT")
    torch.library.register_fake("capsnet::routing_forward", _routing_forward_fake, lib=_LIBRARY)
    torch.library.register_fake("capsnet::routing_backward", _routing_backward_fake, lib=_LIBRARY)
    _register_autograd()
    torch.library.register_autograd(
        "capsnet::routing_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None,
        lib=_LIBRARY,
    )
    torch.library.register_vmap("capsnet::routing_forward", _routing_forward_vmap, lib=_LIBRARY)
    torch.library.register_vmap("capsnet::routing_backward", _routing_backward_vmap, lib=_LIBRARY)


# ---------------------------------------------------------------------------------------
# The public function.
# ---------------------------------------------------------------------------------------
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


def _fused_available(device_type: str, dtype: torch.dtype) -> bool:
    # On the meta device the fake kernels give shapes without computing anything.
    if device_type == "meta":
        return _extension.has_ops() and dtype in _extension.FUSED_DTYPES
    return _extension.has_kernel(device_type, dtype)


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


def _needs_autograd(tensors) -> bool:
    """Whether autograd would record the call (also true inside torch.func.grad/jacrev,
    whose inputs require grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
        Output capsules ``v`` of shape ``[B, N_out, D_out]`` in the dtype of ``u`` (float32
        under ``torch.autocast``, see ``capsnet/autocast.py``), or ``(v, c)`` with
        ``return_couplings``. Gradients flow to ``u``, ``W``, ``bias`` and ``logit_prior``
        through every routing iteration (unless ``detach_routing``).

    The fused backend supports ``torch.autograd``, ``torch.compile``, ``torch.vmap`` and
    ``torch.func.grad``/``jacrev``; for forward-mode AD and second derivatives use
    ``backend="reference"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, flag in (("leaky", leaky), ("detach_routing", detach_routing), ("return_couplings", return_couplings)):
        _check_flag(name, flag)
    num_iterations = check_routing_inputs(u, W, bias, num_iterations, logit_prior=logit_prior)
    device_type = u.device.type
    kernel_dtype = dtype_seen_by_op(u)
    if backend == "fused" and not _fused_available(device_type, kernel_dtype):
        _extension.require_kernel(device_type, kernel_dtype)  # raises, saying what is missing
    use_fused = backend == "fused" or (backend == "auto" and _fused_available(device_type, kernel_dtype))
    if backend == "auto" and not use_fused:
        _warn_fallback_once(device_type, kernel_dtype)
    if use_fused and device_type == "cuda" and not _gpu_is_covered(backend, u.device):
        use_fused = False  # this GPU's architecture was not compiled ("fused" raised instead)
    # The autocast policy: cast first (it depends on autocast being on), then route with it off.
    u, W, bias, logit_prior = (cast_for_routing(t) for t in (u, W, bias, logit_prior))
    with routing_precision(device_type):
        if not use_fused:
            return dynamic_routing_reference(
                u, W, bias, num_iterations, leaky=leaky, detach_routing=detach_routing,
                logit_prior=logit_prior, return_couplings=return_couplings,
            )
        args = (u, W, bias, logit_prior, num_iterations, leaky, detach_routing, return_couplings)
        if torch.compiler.is_compiling():
            v, _s_saved, couplings = torch.ops.capsnet.routing_forward(*args)
        else:
            if _has_forward_tangent((u, W, bias, logit_prior)):
                raise RuntimeError(FORWARD_AD_ERROR)
            if not _needs_autograd((u, W, bias, logit_prior)):
                # Nothing to differentiate (inference, no_grad): the op itself, without an
                # autograd.Function's per-call cost, a tenth of a CapsNet call at batch 1.
                v, _s_saved, couplings = torch.ops.capsnet.routing_forward(*args)
            elif torch._C._are_functorch_transforms_active():
                v, _s_saved, couplings = _FusedRouting.apply(*args)
            else:
                v, _s_saved, couplings = _EagerFusedRouting.apply(*args)
    return (v, couplings) if return_couplings else v
