"""Argument checks shared by every routing backend.

Shapes and dtypes that do not fit raise ValueError, arguments of the wrong Python type
TypeError. Every message names the argument, the shape (or dtype/device) received and what was
expected, so a user can fix the call without reading the kernel source.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from capsnet.autocast import autocast_active, dtype_seen_by_op

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Largest num_iterations accepted (csrc/routing_math.h, kMaxRoutingIterations, says the same).
MAX_ITERATIONS = 1 << 16


def _check_tensor(name: str, x: object, rank: int, expected: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions {expected}, got shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a float16, bfloat16, float32 or float64 tensor, got dtype {x.dtype}"
        )


def check_num_iterations(num_iterations: object) -> int:
    """``num_iterations`` as a Python int (NumPy integers accepted), or a TypeError/ValueError."""
    if isinstance(num_iterations, bool):
        raise TypeError(f"num_iterations must be an int >= 1, got {num_iterations!r}")
    try:
        value = operator.index(num_iterations)
    except TypeError:
        raise TypeError(f"num_iterations must be an int >= 1, got {num_iterations!r}") from None
    if not 1 <= value <= MAX_ITERATIONS:
        raise ValueError(f"num_iterations must be between 1 and {MAX_ITERATIONS}, got {value}")
    return value


def _check_companion(name: str, t: Tensor, u: Tensor) -> None:
    if dtype_seen_by_op(t) != dtype_seen_by_op(u):  # autocast casts half inputs to float32
        under_autocast = (
            " (under torch.autocast, float16 and bfloat16 count as float32)" if autocast_active(u.device.type) else ""
        )
        raise ValueError(f"{name} must have the dtype of u ({u.dtype}), got {t.dtype}{under_autocast}")
    if t.device != u.device:
        raise ValueError(f"{name} must be on the device of u ({u.device}), got {t.device}")


def check_routing_inputs(
    u: Tensor,
    W: Tensor,
    bias: Tensor | None,
    num_iterations: object,
    *,
    logit_prior: Tensor | None = None,
) -> int:
    """Raise a ValueError/TypeError naming the argument if the routing inputs do not fit;
    return ``num_iterations`` as an int."""
    _check_tensor("u", u, 3, "[B, N_in, D_in]")
    _check_tensor("W", W, 4, "[N_in, N_out, D_out, D_in]")
    _batch, num_in, dim_in = u.shape
    w_num_in, num_out, dim_out, w_dim_in = W.shape
    if w_num_in != num_in or w_dim_in != dim_in:
        raise ValueError(
            f"W must have shape [N_in={num_in}, N_out, D_out, D_in={dim_in}] to match u of shape "
            f"{tuple(u.shape)}, got W of shape {tuple(W.shape)}"
        )
    for dim_name, size in (("N_in", num_in), ("D_in", dim_in), ("N_out", num_out), ("D_out", dim_out)):
        if size < 1:
            raise ValueError(
                f"{dim_name} must be at least 1, got u of shape {tuple(u.shape)} and W of shape "
                f"{tuple(W.shape)} (only the batch dimension B may be 0)"
            )
    _check_companion("W", W, u)
    if bias is not None:
        _check_tensor("bias", bias, 2, "[N_out, D_out]")
        if tuple(bias.shape) != (num_out, dim_out):
            raise ValueError(
                f"bias must have shape [N_out, D_out] = [{num_out}, {dim_out}] to match W of shape "
                f"{tuple(W.shape)}, got bias of shape {tuple(bias.shape)}"
            )
        _check_companion("bias", bias, u)
    if logit_prior is not None:
        _check_tensor("logit_prior", logit_prior, 2, "[N_in, N_out]")
        if tuple(logit_prior.shape) != (num_in, num_out):
            raise ValueError(
                f"logit_prior must have shape [N_in, N_out] = [{num_in}, {num_out}] to match W of "
                f"shape {tuple(W.shape)}, got logit_prior of shape {tuple(logit_prior.shape)}"
            )
        _check_companion("logit_prior", logit_prior, u)
    return check_num_iterations(num_iterations)
