"""Bad input: a clear error naming the argument, what was received and what was expected."""

from __future__ import annotations

import pytest
import torch

from capsnet import dynamic_routing

BACKENDS = ["reference", "fused", "auto"]


def _good():
    return torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 5)


BAD_SHAPES = [
    # (label, u, W, bias, exception, message regex)
    ("u rank 2", torch.randn(6, 3), torch.randn(6, 4, 5, 3), None, ValueError, r"u must have 3 dimensions \[B, N_in, D_in\], got shape \(6, 3\)"),
    ("W rank 3", torch.randn(2, 6, 3), torch.randn(6, 4, 5), None, ValueError, r"W must have 4 dimensions \[N_in, N_out, D_out, D_in\], got shape \(6, 4, 5\)"),
    ("W N_in", torch.randn(2, 6, 3), torch.randn(7, 4, 5, 3), None, ValueError, r"W must have shape \[N_in=6, N_out, D_out, D_in=3\].*got W of shape \(7, 4, 5, 3\)"),
    ("W D_in", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 2), None, ValueError, r"W must have shape \[N_in=6, N_out, D_out, D_in=3\].*got W of shape \(6, 4, 5, 2\)"),
    ("bias N_out", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(3, 5), ValueError, r"bias must have shape \[N_out, D_out\] = \[4, 5\].*got bias of shape \(3, 5\)"),
    ("bias D_out", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 6), ValueError, r"bias must have shape \[N_out, D_out\] = \[4, 5\].*got bias of shape \(4, 6\)"),
    ("bias rank 1", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(20), ValueError, r"bias must have 2 dimensions \[N_out, D_out\], got shape \(20,\)"),
    ("N_in = 0", torch.randn(2, 0, 3), torch.randn(0, 4, 5, 3), None, ValueError, r"N_in must be at least 1, got u of shape \(2, 0, 3\)"),
    ("D_in = 0", torch.randn(2, 6, 0), torch.randn(6, 4, 5, 0), None, ValueError, r"D_in must be at least 1"),
    ("N_out = 0", torch.randn(2, 6, 3), torch.randn(6, 0, 5, 3), None, ValueError, r"N_out must be at least 1.*W of shape \(6, 0, 5, 3\)"),
    ("D_out = 0", torch.randn(2, 6, 3), torch.randn(6, 4, 0, 3), None, ValueError, r"D_out must be at least 1"),
    ("integer u", torch.ones(2, 6, 3, dtype=torch.int64), torch.randn(6, 4, 5, 3), None, ValueError, r"u must be a floating-point tensor.*got dtype torch.int64"),
    ("integer W", torch.randn(2, 6, 3), torch.ones(6, 4, 5, 3, dtype=torch.int32), None, ValueError, r"W must be a floating-point tensor.*got dtype torch.int32"),
    ("dtype mismatch W", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3, dtype=torch.float64), None, ValueError, r"W must have the dtype of u \(torch.float32\), got torch.float64"),
    ("dtype mismatch bias", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 5, dtype=torch.float64), ValueError, r"bias must have the dtype of u \(torch.float32\), got torch.float64"),
    ("device mismatch W", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3, device="meta"), None, ValueError, r"W must be on the device of u \(cpu\), got meta"),
    ("device mismatch bias", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 5, device="meta"), ValueError, r"bias must be on the device of u \(cpu\), got meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label,u,W,bias,error,message", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_tensors_are_rejected(label, u, W, bias, error, message, backend):
    with pytest.raises(error, match=message):
        dynamic_routing(u, W, bias, 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "num_iterations,error,message",
    [
        (0, ValueError, "num_iterations must be at least 1, got 0"),
        (-2, ValueError, "num_iterations must be at least 1, got -2"),
        (2.5, TypeError, "num_iterations must be an int >= 1, got 2.5"),
        (True, TypeError, "num_iterations must be an int >= 1, got True"),
    ],
)
def test_bad_num_iterations(num_iterations, error, message, backend):
    u, W, bias = _good()
    with pytest.raises(error, match=message):
        dynamic_routing(u, W, bias, num_iterations, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_is_rejected(backend):
    _, W, bias = _good()
    with pytest.raises(TypeError, match=r"u must be a torch.Tensor of shape \[B, N_in, D_in\], got list"):
        dynamic_routing([[1.0]], W, bias, 3, backend=backend)


# Direct calls to the compiled op bypass the Python checks: the C++ checks must catch them.
DIRECT_CASES = [
    ("u rank", (torch.randn(6, 3), torch.randn(6, 4, 5, 3), None, 3), r"u must have 3 dimensions"),
    ("W shape", (torch.randn(2, 6, 3), torch.randn(6, 4, 5, 2), None, 3), r"W must have shape \[N_in=6, N_out, D_out, D_in=3\]"),
    ("bias shape", (torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(5, 4), 3), r"bias must have shape \[N_out, D_out\] = \[4, 5\]"),
    ("iterations", (torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, 0), r"num_iterations must be at least 1, got 0"),
    ("int dtype", (torch.ones(2, 6, 3, dtype=torch.int64), torch.ones(6, 4, 5, 3, dtype=torch.int64), None, 3), r"u must be float32 or float64"),
    ("dtype mismatch", (torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3, dtype=torch.float64), None, 3), r"W must have the dtype of u"),
    ("empty N_in", (torch.randn(2, 0, 3), torch.randn(0, 4, 5, 3), None, 3), r"must be at least 1"),
]


@pytest.mark.parametrize("label,args,message", DIRECT_CASES, ids=[c[0] for c in DIRECT_CASES])
def test_direct_op_calls_are_checked(label, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.capsnet.routing_forward(*args)


def test_direct_backward_call_is_checked():
    u, W, bias = _good()
    v, s_saved, couplings = torch.ops.capsnet.routing_forward(u, W, bias, 3)
    with pytest.raises(RuntimeError, match=r"grad_v must have shape \[B, N_out, D_out\] = \[2, 4, 5\]"):
        torch.ops.capsnet.routing_backward(torch.randn(2, 5, 4), u, W, s_saved, couplings)
    with pytest.raises(RuntimeError, match=r"s_saved must have shape \[B=2, r, N_out=4, D_out=5\]"):
        torch.ops.capsnet.routing_backward(torch.randn_like(v), u, W, s_saved[:, :, :3], couplings)
    with pytest.raises(RuntimeError, match=r"couplings must have shape \[B, r, N_out, N_in\] = \[2, 3, 4, 6\]"):
        torch.ops.capsnet.routing_backward(torch.randn_like(v), u, W, s_saved, couplings[..., :5])
