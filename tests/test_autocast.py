"""The autocast policy (capsnet/autocast.py): under torch.autocast, on CPU and CUDA, with either
backend and in direct op calls, the routing runs in float32 and returns float32; outside
autocast, float16/bfloat16 inputs run natively."""

from __future__ import annotations

import warnings

import pytest
import torch

from capsnet import CapsNet, CapsNetConfig, dynamic_routing
from conftest import DEVICES
from routing_testing import RoutingCase, make_inputs

CASE = RoutingCase(batch=3, num_in=6, num_out=4, dim_out=5, dim_in=3, iterations=3)
HALF_DTYPES = [torch.bfloat16, torch.float16]


def _half_inputs(dtype, device):
    """u in ``dtype`` (as a half-precision layer under autocast would give it), W, bias and the
    prior in float32 (parameters), all requiring grad."""
    u, W, bias, grad_v = make_inputs(CASE, dtype=torch.float32, device=device, requires_grad=False)
    prior = torch.randn(CASE.num_in, CASE.num_out, device=device)
    u = u.to(dtype).requires_grad_()
    return u, W.requires_grad_(), bias.requires_grad_(), prior.requires_grad_(), grad_v


def test_policy_is_registered_for_cpu_and_cuda():
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("capsnet::routing_forward", key), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "reference", "auto"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "f16"])
def test_under_autocast_routing_runs_in_float32(dtype, backend, device):
    u, W, bias, prior, grad_v = _half_inputs(dtype, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" finds the float32 kernel: no fallback warning
        with torch.autocast(device, dtype=dtype):
            v = dynamic_routing(u, W, bias, 3, leaky=True, logit_prior=prior, backend=backend)
    assert v.dtype == torch.float32
    # Exactly the routing of the float32-cast inputs, outside autocast.
    expected = dynamic_routing(u.float(), W, bias, 3, leaky=True, logit_prior=prior, backend=backend)
    assert torch.equal(v, expected)
    # Gradients flow back through the casts, each in its input's dtype.
    grads = torch.autograd.grad(v, (u, W, bias, prior), grad_v)
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32, torch.float32]
    expected_grads = torch.autograd.grad(expected, (u, W, bias, prior), grad_v)
    assert torch.equal(grads[0], expected_grads[0].to(dtype))
    for actual, wanted in zip(grads[1:], expected_grads[1:]):
        assert torch.equal(actual, wanted)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "f16"])
def test_direct_op_call_under_autocast_runs_in_float32(dtype, device):
    u, W, bias, prior, grad_v = _half_inputs(dtype, device)
    with torch.autocast(device, dtype=dtype):
        v, s_saved, _ = torch.ops.capsnet.routing_forward(u, W, bias, prior, 3, False, False, False)
    assert v.dtype == torch.float32 and s_saved.dtype == torch.float32
    expected, _, _ = torch.ops.capsnet.routing_forward(u.float(), W, bias, prior, 3, False, False, False)
    assert torch.equal(v, expected)
    (grad_u,) = torch.autograd.grad(v, u, grad_v)
    assert grad_u.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "f16"])
def test_float64_is_not_cast_by_autocast(dtype, device):
    u, W, bias, _ = make_inputs(CASE, dtype=torch.float64, device=device, requires_grad=False)
    with torch.autocast(device, dtype=dtype):
        v = dynamic_routing(u, W, bias, 3)
    assert v.dtype == torch.float64
    assert torch.equal(v, dynamic_routing(u, W, bias, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_float64_and_half_under_autocast_is_a_clear_error(device):
    u, W, bias, _ = make_inputs(CASE, dtype=torch.float64, device=device, requires_grad=False)
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"W must have the dtype of u \(torch.float64\), got torch.bfloat16 \(under torch.autocast"):
            dynamic_routing(u, W.bfloat16(), bias, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "f16"])
def test_outside_autocast_half_inputs_run_natively_on_the_fused_kernel(dtype, device):
    u, W, bias, grad_v = make_inputs(CASE, dtype=dtype, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fused kernel exists for half types: no fallback
        v = dynamic_routing(u, W, bias, 3, backend="auto")
    assert v.dtype == dtype
    fused = dynamic_routing(u, W, bias, 3, backend="fused")
    assert torch.equal(v, fused)
    grads = torch.autograd.grad(v, (u, W, bias), grad_v)
    assert all(g.dtype == dtype for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_under_autocast(device):
    u, W, bias, prior, grad_v = _half_inputs(torch.bfloat16, device)

    def model(u, W, bias, prior):
        return dynamic_routing(u, W, bias, 3, logit_prior=prior, backend="fused") * 2.0

    torch._dynamo.reset()
    with torch.autocast(device, dtype=torch.bfloat16):
        eager = model(u, W, bias, prior)
        compiled = torch.compile(model, fullgraph=True)(u, W, bias, prior)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_capsnet_under_cpu_autocast_routes_in_float32():
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(), routing_backend="auto")
    images = torch.rand(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, torch.tensor([0, 1]))
    assert out.digit_caps.dtype == torch.float32
    (out.lengths.sum() + out.reconstructions.float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_capsnet_on_the_meta_device(backend):
    # Building and running a model on the meta device (shapes only, e.g. to size it before
    # materialising it) used to fail in DigitCaps, which entered torch.autocast('meta').
    with torch.device("meta"):
        model = CapsNet(CapsNetConfig(), routing_backend=backend)
        images = torch.rand(3, 1, 28, 28)
        labels = torch.tensor([0, 1, 2])
    out = model(images, labels)
    assert out.digit_caps.device.type == "meta"
    assert out.digit_caps.shape == (3, 10, 16) and out.lengths.shape == (3, 10)
    assert out.reconstructions.shape == (3, 1, 28, 28)
