"""Bad input: a clear error naming the argument, what was received and what was expected.

Through :func:`capsnet.dynamic_routing` (every backend), and in direct calls of the compiled
ops with real, fake and meta tensors and under ``torch.compile``: the fake kernels check
shapes like the C++ kernels, with the same messages.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from capsnet import dynamic_routing

BACKENDS = ["reference", "fused", "auto"]


def _good():
    return torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 5)


BAD_SHAPES = [
    # (label, u, W, bias, logit_prior, exception, message regex)
    ("u rank 2", torch.randn(6, 3), torch.randn(6, 4, 5, 3), None, None, ValueError, r"u must have 3 dimensions \[B, N_in, D_in\], got shape \(6, 3\)"),
    ("W rank 3", torch.randn(2, 6, 3), torch.randn(6, 4, 5), None, None, ValueError, r"W must have 4 dimensions \[N_in, N_out, D_out, D_in\], got shape \(6, 4, 5\)"),
    ("W N_in", torch.randn(2, 6, 3), torch.randn(7, 4, 5, 3), None, None, ValueError, r"W must have shape \[N_in=6, N_out, D_out, D_in=3\].*got W of shape \(7, 4, 5, 3\)"),
    ("W D_in", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 2), None, None, ValueError, r"W must have shape \[N_in=6, N_out, D_out, D_in=3\].*got W of shape \(6, 4, 5, 2\)"),
    ("bias N_out", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(3, 5), None, ValueError, r"bias must have shape \[N_out, D_out\] = \[4, 5\].*got bias of shape \(3, 5\)"),
    ("bias D_out", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 6), None, ValueError, r"bias must have shape \[N_out, D_out\] = \[4, 5\].*got bias of shape \(4, 6\)"),
    ("bias rank 1", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(20), None, ValueError, r"bias must have 2 dimensions \[N_out, D_out\], got shape \(20,\)"),
    ("prior N_in", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, torch.randn(5, 4), ValueError, r"logit_prior must have shape \[N_in, N_out\] = \[6, 4\].*got logit_prior of shape \(5, 4\)"),
    ("prior N_out", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, torch.randn(6, 3), ValueError, r"logit_prior must have shape \[N_in, N_out\] = \[6, 4\].*got logit_prior of shape \(6, 3\)"),
    ("prior rank 3", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, torch.randn(2, 6, 4), ValueError, r"logit_prior must have 2 dimensions \[N_in, N_out\], got shape \(2, 6, 4\)"),
    ("N_in = 0", torch.randn(2, 0, 3), torch.randn(0, 4, 5, 3), None, None, ValueError, r"N_in must be at least 1, got u of shape \(2, 0, 3\)"),
    ("D_in = 0", torch.randn(2, 6, 0), torch.randn(6, 4, 5, 0), None, None, ValueError, r"D_in must be at least 1"),
    ("N_out = 0", torch.randn(2, 6, 3), torch.randn(6, 0, 5, 3), None, None, ValueError, r"N_out must be at least 1.*W of shape \(6, 0, 5, 3\)"),
    ("D_out = 0", torch.randn(2, 6, 3), torch.randn(6, 4, 0, 3), None, None, ValueError, r"D_out must be at least 1"),
    ("integer u", torch.ones(2, 6, 3, dtype=torch.int64), torch.randn(6, 4, 5, 3), None, None, ValueError, r"u must be a float16, bfloat16, float32 or float64 tensor, got dtype torch.int64"),
    ("integer W", torch.randn(2, 6, 3), torch.ones(6, 4, 5, 3, dtype=torch.int32), None, None, ValueError, r"W must be a float16, bfloat16, float32 or float64 tensor, got dtype torch.int32"),
    ("dtype mismatch W", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3, dtype=torch.float64), None, None, ValueError, r"W must have the dtype of u \(torch.float32\), got torch.float64"),
    ("half u, float W", torch.randn(2, 6, 3, dtype=torch.float16), torch.randn(6, 4, 5, 3), None, None, ValueError, r"W must have the dtype of u \(torch.float16\), got torch.float32"),
    ("dtype mismatch bias", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 5, dtype=torch.float64), None, ValueError, r"bias must have the dtype of u \(torch.float32\), got torch.float64"),
    ("dtype mismatch prior", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, torch.randn(6, 4, dtype=torch.bfloat16), ValueError, r"logit_prior must have the dtype of u \(torch.float32\), got torch.bfloat16"),
    ("device mismatch W", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3, device="meta"), None, None, ValueError, r"W must be on the device of u \(cpu\), got meta"),
    ("device mismatch bias", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(4, 5, device="meta"), None, ValueError, r"bias must be on the device of u \(cpu\), got meta"),
    ("device mismatch prior", torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, torch.randn(6, 4, device="meta"), ValueError, r"logit_prior must be on the device of u \(cpu\), got meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label,u,W,bias,prior,error,message", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_tensors_are_rejected(label, u, W, bias, prior, error, message, backend):
    with pytest.raises(error, match=message):
        dynamic_routing(u, W, bias, 3, logit_prior=prior, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "num_iterations,error,message",
    [
        (0, ValueError, r"num_iterations must be between 1 and 65536, got 0"),
        (-1, ValueError, r"num_iterations must be between 1 and 65536, got -1"),
        (2**63, ValueError, r"num_iterations must be between 1 and 65536, got 9223372036854775808"),
        (65537, ValueError, r"num_iterations must be between 1 and 65536, got 65537"),
        (1.5, TypeError, r"num_iterations must be an int >= 1, got 1.5"),
        (3.0, TypeError, r"num_iterations must be an int >= 1, got 3.0"),
        (True, TypeError, r"num_iterations must be an int >= 1, got True"),
        (np.True_, TypeError, r"num_iterations must be an int >= 1, got (np\.)?True_?"),
        ("3", TypeError, r"num_iterations must be an int >= 1, got '3'"),
        (np.int64(0), ValueError, r"num_iterations must be between 1 and 65536, got 0"),
    ],
    ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__,
)
def test_bad_num_iterations(num_iterations, error, message, backend):
    u, W, bias = _good()
    with pytest.raises(error, match=message):
        dynamic_routing(u, W, bias, num_iterations, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_iterations", [np.int64(2), np.int32(2), np.uint8(2)], ids=lambda x: type(x).__name__)
def test_numpy_integer_iterations_are_accepted(num_iterations, backend):
    u, W, bias = _good()
    expected = dynamic_routing(u, W, bias, 2, backend=backend)
    assert torch.equal(dynamic_routing(u, W, bias, num_iterations, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", ["leaky", "detach_routing", "return_couplings"])
def test_option_flags_must_be_bools(flag, backend):
    u, W, bias = _good()
    with pytest.raises(TypeError, match=rf"{flag} must be a bool, got 1"):
        dynamic_routing(u, W, bias, 3, backend=backend, **{flag: 1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_is_rejected(backend):
    _, W, bias = _good()
    with pytest.raises(TypeError, match=r"u must be a torch.Tensor of shape \[B, N_in, D_in\], got list"):
        dynamic_routing([[1.0]], W, bias, 3, backend=backend)


# Direct calls to the compiled op bypass the Python checks: the C++ checks must catch them,
# and the fake kernels (fake and meta tensors, torch.compile) the same way.
def _forward_args(u, W, bias=None, prior=None, num_iterations=3):
    return (u, W, bias, prior, num_iterations, False, False, False)


DIRECT_CASES = [
    ("u rank", _forward_args(torch.randn(6, 3), torch.randn(6, 4, 5, 3)), r"u must have 3 dimensions"),
    ("W rank", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5)), r"W must have 4 dimensions"),
    ("W shape", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 2)), r"W must have shape \[N_in=6, N_out, D_out, D_in=3\]"),
    ("bias shape", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), torch.randn(5, 4)), r"bias must have shape \[N_out, D_out\] = \[4, 5\]"),
    ("prior shape", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, torch.randn(4, 6)), r"logit_prior must have shape \[N_in, N_out\] = \[6, 4\]"),
    ("iterations 0", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), num_iterations=0), r"num_iterations must be between 1 and 65536, got 0"),
    ("iterations -1", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), num_iterations=-1), r"num_iterations must be between 1 and 65536, got -1"),
    ("iterations 2**62", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), num_iterations=2**62), r"num_iterations must be between 1 and 65536, got 4611686018427387904"),
    ("int dtype", _forward_args(torch.ones(2, 6, 3, dtype=torch.int64), torch.ones(6, 4, 5, 3, dtype=torch.int64)), r"u must be float16, bfloat16, float32 or float64"),
    ("dtype mismatch", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3, dtype=torch.float64)), r"W must have the dtype of u"),
    ("prior dtype", _forward_args(torch.randn(2, 6, 3), torch.randn(6, 4, 5, 3), None, torch.randn(6, 4, dtype=torch.float64)), r"logit_prior must have the dtype of u"),
    ("empty N_in", _forward_args(torch.randn(2, 0, 3), torch.randn(0, 4, 5, 3)), r"must be at least 1"),
]
DIRECT_IDS = [c[0] for c in DIRECT_CASES]


@pytest.mark.parametrize("label,args,message", DIRECT_CASES, ids=DIRECT_IDS)
def test_direct_op_calls_are_checked(label, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.capsnet.routing_forward(*args)


def _to_fake_or_meta(args, kind):
    if kind == "meta":
        return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    mode = FakeTensorMode()
    return tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args), mode


@pytest.mark.parametrize("label,args,message", DIRECT_CASES, ids=DIRECT_IDS)
def test_direct_op_calls_with_meta_tensors_are_checked_like_the_kernels(label, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.capsnet.routing_forward(*_to_fake_or_meta(args, "meta"))


@pytest.mark.parametrize("label,args,message", DIRECT_CASES, ids=DIRECT_IDS)
def test_direct_op_calls_with_fake_tensors_are_checked_like_the_kernels(label, args, message):
    fake_args, mode = _to_fake_or_meta(args, "fake")
    with mode, pytest.raises(RuntimeError, match=message):
        torch.ops.capsnet.routing_forward(*fake_args)


def test_good_direct_calls_with_fake_and_meta_tensors_give_the_kernels_shapes():
    u, W, bias = _good()
    prior = torch.randn(6, 4)
    args = (u, W, bias, prior, 3, True, False, True)
    real = torch.ops.capsnet.routing_forward(*args)
    meta = torch.ops.capsnet.routing_forward(*_to_fake_or_meta(args, "meta"))
    fake_args, mode = _to_fake_or_meta(args, "fake")
    with mode:
        fake = torch.ops.capsnet.routing_forward(*fake_args)
    for name, r, m, f in zip(("v", "s_saved", "couplings"), real, meta, fake):
        assert m.shape == r.shape and f.shape == r.shape, name
        assert m.dtype == r.dtype and f.dtype == r.dtype, name


@pytest.mark.parametrize("label,args,message", DIRECT_CASES[:6], ids=DIRECT_IDS[:6])
def test_torch_compile_of_a_bad_direct_call_fails_with_the_kernels_message(label, args, message):
    torch._dynamo.reset()

    def call(*tensors):
        return torch.ops.capsnet.routing_forward(*tensors, *args[4:])[0]

    # The fake kernel raises while tracing; dynamo wraps it but keeps the message.
    with pytest.raises(Exception, match=message):
        torch.compile(call, fullgraph=True, backend="eager")(*args[:4])


@pytest.mark.parametrize(
    "num_iterations,message",
    [
        # Outside int64: torch's argument parser refuses it before any capsnet code runs; its
        # message names the argument.
        (2**63, r"argument 'num_iterations'"),
        (1.5, r"argument 'num_iterations'.*float"),
    ],
    ids=["2**63", "1.5"],
)
def test_direct_op_call_with_an_iteration_count_the_schema_cannot_hold(num_iterations, message):
    u, W, bias = _good()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.capsnet.routing_forward(u, W, bias, None, num_iterations, False, False, False)


def test_direct_op_call_accepts_a_numpy_integer():
    u, W, bias = _good()
    expected = torch.ops.capsnet.routing_forward(u, W, bias, None, 2, False, False, False)
    actual = torch.ops.capsnet.routing_forward(u, W, bias, None, np.int64(2), False, False, False)
    for a, b in zip(actual, expected):
        assert torch.equal(a, b)


def test_direct_backward_calls_are_checked():
    u, W, bias = _good()
    v, s_saved, _ = torch.ops.capsnet.routing_forward(u, W, bias, None, 3, False, False, False)
    cases = [
        ((torch.randn(2, 5, 4), u, W, None, s_saved), r"grad_v must have shape \[B, N_out, D_out\] = \[2, 4, 5\]"),
        ((torch.randn_like(v), u, W, None, s_saved[:, :, :3]), r"s_saved must have shape \[B=2, r, N_out=4, D_out=5\]"),
        ((torch.randn_like(v), u, W, None, s_saved[0]), r"s_saved must have 4 dimensions"),
        ((torch.randn_like(v), u, W, None, s_saved.double()), r"s_saved must have dtype (torch\.float32|Float)"),
        ((torch.randn_like(v), u, W, torch.randn(6, 3), s_saved), r"logit_prior must have shape \[N_in, N_out\] = \[6, 4\]"),
        ((torch.randn_like(v).double(), u, W, None, s_saved), r"grad_v must have the dtype of u"),
    ]
    for args, message in cases:
        for kind in ("real", "meta", "fake"):
            full = args + (False, False)
            if kind == "real":
                with pytest.raises(RuntimeError, match=message):
                    torch.ops.capsnet.routing_backward(*full)
            elif kind == "meta":
                with pytest.raises(RuntimeError, match=message):
                    torch.ops.capsnet.routing_backward(*_to_fake_or_meta(full, "meta"))
            else:
                fake_args, mode = _to_fake_or_meta(full, "fake")
                with mode, pytest.raises(RuntimeError, match=message):
                    torch.ops.capsnet.routing_backward(*fake_args)
