"""The op as the dispatcher sees it: opcheck, torch.compile, double backward, backend choice."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._inductor.config

import capsnet
from capsnet import _extension, dynamic_routing
from capsnet import ops as capsnet_ops
from conftest import DEVICES
from routing_testing import RoutingCase, assert_close_report, make_inputs, run_routing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias, dtype, device):
    case = RoutingCase(batch=2, num_in=5, num_out=3, dim_out=4, dim_in=3, iterations=3, with_bias=with_bias)
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.capsnet.routing_forward.default, (u, W, bias, 3))
    with torch.no_grad():
        _, s_saved, couplings = torch.ops.capsnet.routing_forward(u, W, bias, 3)
    torch.library.opcheck(
        torch.ops.capsnet.routing_backward.default,
        (grad_v, u.detach(), W.detach(), s_saved, couplings),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    case = RoutingCase(batch=3, num_in=6, num_out=4, dim_out=5, dim_in=3, iterations=3)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device=device)

    def model(u, W, bias):
        # Something around the op, so that the compiled graph is more than the op alone.
        v = dynamic_routing(torch.tanh(u), W, bias, 3, backend="fused")
        return v * 2.0

    compiled = torch.compile(model, fullgraph=True)
    eager_v = model(u, W, bias)
    eager_grads = torch.autograd.grad(eager_v, (u, W, bias), grad_v)
    # Caches off: a graph cached by an earlier build of the extension (with another op
    # schema) must not stand in for compiling this one.
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled_v = compiled(u, W, bias)
    compiled_grads = torch.autograd.grad(compiled_v, (u, W, bias), grad_v)
    assert_close_report(compiled_v, eager_v, "v")
    for name, actual, expected in zip(("grad_u", "grad_W", "grad_bias"), compiled_grads, eager_grads):
        assert_close_report(actual, expected, name)


def test_double_backward_raises_clear_error():
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, grad_v = make_inputs(case)
    v = dynamic_routing(u, W, bias, 3, backend="fused")
    (grad_u,) = torch.autograd.grad(v, u, grad_v, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_u.sum().backward()


def test_reference_supports_double_backward():
    case = RoutingCase(batch=1, num_in=2, num_out=2, dim_out=2, dim_in=2)
    u, W, bias, grad_v = make_inputs(case)
    v = dynamic_routing(u, W, bias, 3, backend="reference")
    (grad_u,) = torch.autograd.grad(v, u, grad_v, create_graph=True)
    (grad_W,) = torch.autograd.grad(grad_u.sum(), W)
    assert torch.isfinite(grad_W).all()


def test_auto_uses_fused_kernel_on_cpu():
    assert capsnet.has_kernel("cpu", torch.float32) and capsnet.has_kernel("cpu", torch.float64)
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, grad_v = make_inputs(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        auto = run_routing(u, W, bias, grad_v, 3, backend="auto")
    fused = run_routing(u, W, bias, grad_v, 3, backend="fused")
    for name in fused:
        assert torch.equal(auto[name], fused[name])


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(capsnet_ops, "_warned_fallbacks", set())
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, _ = make_inputs(case, dtype=torch.float16, requires_grad=False)
    with pytest.warns(UserWarning, match="no fused routing kernel.*float16"):
        v = dynamic_routing(u, W, bias, 3, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        dynamic_routing(u, W, bias, 3, backend="auto")
    expected = dynamic_routing(u.double(), W.double(), bias.double(), 3, backend="reference")
    torch.testing.assert_close(v.double(), expected, atol=5e-3, rtol=1e-3)


def test_fused_rejects_unsupported_dtype():
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, _ = make_inputs(case, dtype=torch.bfloat16, requires_grad=False)
    with pytest.raises(RuntimeError, match="float32.*float64.*bfloat16"):
        dynamic_routing(u, W, bias, 3, backend="fused")


def test_fused_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_LOAD_ERROR", "No module named 'capsnet._C'")
    monkeypatch.setattr(_extension, "KERNEL_DEVICE_TYPES", frozenset())
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        dynamic_routing(u, W, bias, 3, backend="fused")


def test_unknown_backend_is_rejected():
    case = RoutingCase(batch=1, num_in=2, num_out=2, dim_out=2, dim_in=2)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        dynamic_routing(u, W, bias, 3, backend="cuda")
