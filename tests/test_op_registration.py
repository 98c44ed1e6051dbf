"""The op as the dispatcher sees it: opcheck and torch.compile for every combination of options,
double backward, backend choice."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch._inductor.config

import capsnet
from capsnet import _extension, dynamic_routing
from capsnet import ops as capsnet_ops
from conftest import DEVICES
from routing_testing import RoutingCase, assert_close_report, make_inputs, run_routing

# (leaky, detach_routing, with_prior, return_couplings): every combination.
OPTIONS = list(itertools.product([False, True], repeat=4))


def options_id(options):
    names = ("leaky", "detach", "prior", "couplings")
    return "-".join(name for name, on in zip(names, options) if on) or "default"


def _prior(case, dtype, device, requires_grad=True):
    gen = torch.Generator().manual_seed(7)
    prior = torch.randn(case.num_in, case.num_out, generator=gen, dtype=torch.float64)
    return prior.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def _opcheck_both_ops(case, dtype, device, leaky, detach_routing, with_prior, return_couplings):
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device=device)
    prior = _prior(case, dtype, device) if with_prior else None
    args = (u, W, bias, prior, case.iterations, leaky, detach_routing, return_couplings)
    torch.library.opcheck(torch.ops.capsnet.routing_forward.default, args)
    with torch.no_grad():
        _, s_saved, _ = torch.ops.capsnet.routing_forward(*args)
    detached_prior = prior.detach() if prior is not None else None
    torch.library.opcheck(
        torch.ops.capsnet.routing_backward.default,
        (grad_v, u.detach(), W.detach(), detached_prior, s_saved, leaky, detach_routing),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_opcheck_every_option_combination(options, device):
    case = RoutingCase(batch=2, num_in=5, num_out=3, dim_out=4, dim_in=3, iterations=3, with_bias=True)
    _opcheck_both_ops(case, torch.float64, device, *options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[-1]], ids=options_id)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_other_dtypes(with_bias, options, dtype, device):
    case = RoutingCase(batch=2, num_in=5, num_out=3, dim_out=4, dim_in=3, iterations=2, with_bias=with_bias)
    _opcheck_both_ops(case, dtype, device, *options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_torch_compile_fullgraph_every_option_combination(options, device):
    leaky, detach_routing, with_prior, return_couplings = options
    case = RoutingCase(batch=3, num_in=6, num_out=4, dim_out=5, dim_in=3, iterations=3)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device=device)
    prior = _prior(case, torch.float32, device)

    def model(u, W, bias, prior):
        # Something around the op, so that the compiled graph is more than the op alone.
        out = dynamic_routing(
            torch.tanh(u), W, bias, 3, leaky=leaky, detach_routing=detach_routing,
            logit_prior=prior if with_prior else None, return_couplings=return_couplings, backend="fused",
        )
        v, couplings = out if return_couplings else (out, None)
        return v * 2.0, couplings

    wrt = (u, W, bias) + ((prior,) if with_prior and not detach_routing else ())
    eager_v, eager_c = model(u, W, bias, prior)
    eager_grads = torch.autograd.grad(eager_v, wrt, grad_v)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    # Caches off: a graph cached by an earlier build of the extension (with another op
    # schema) must not stand in for compiling this one.
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled_v, compiled_c = compiled(u, W, bias, prior)
    compiled_grads = torch.autograd.grad(compiled_v, wrt, grad_v)
    assert_close_report(compiled_v, eager_v, "v")
    if return_couplings:
        assert_close_report(compiled_c, eager_c, "couplings")
    for name, actual, expected in zip(("grad_u", "grad_W", "grad_bias", "grad_prior"), compiled_grads, eager_grads):
        assert_close_report(actual, expected, name)


def test_double_backward_raises_clear_error():
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, grad_v = make_inputs(case)
    v = dynamic_routing(u, W, bias, 3, backend="fused")
    (grad_u,) = torch.autograd.grad(v, u, grad_v, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        grad_u.sum().backward()


def test_double_backward_of_a_direct_op_call_raises_clear_error():
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, grad_v = make_inputs(case)
    v, _, _ = torch.ops.capsnet.routing_forward(u, W, bias, None, 3, False, False, False)
    (grad_u,) = torch.autograd.grad(v, u, grad_v, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        grad_u.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_both_autograd_functions_give_the_same_bits(options, device):
    """dynamic_routing's two autograd.Functions run the same kernels and formula:
    _EagerFusedRouting (plain autograd) and _FusedRouting (under the torch.func transforms)
    give bitwise the same outputs and gradients."""
    leaky, detach_routing, with_prior, return_couplings = options
    case = RoutingCase(batch=3, num_in=5, num_out=4, dim_out=6, dim_in=3)
    results = []
    for function in (capsnet_ops._EagerFusedRouting, capsnet_ops._FusedRouting):
        u, W, bias, grad_v = make_inputs(case, device=device)
        prior = _prior(case, torch.float64, device) if with_prior else None
        v, _, couplings = function.apply(u, W, bias, prior, case.iterations, leaky, detach_routing, return_couplings)
        leaves = [t for t in (u, W, bias, prior) if t is not None]
        grads = torch.autograd.grad(v, leaves, grad_v, allow_unused=True)
        results.append((v, couplings, *grads))
    for name, eager, transform in zip(("v", "couplings", "grad_u", "grad_W", "grad_bias", "grad_prior"), *results):
        if eager is None or transform is None:
            assert eager is None and transform is None, name
        else:
            assert torch.equal(eager, transform), name


def test_a_training_step_skips_the_python_autograd_layers(monkeypatch):
    """Outside the torch.func transforms, a forward and backward through dynamic_routing binds
    no function signature (an autograd.Function with setup_context does, on every apply) and
    runs neither op's Python Autograd kernel (which redispatch through OpOverload.redispatch):
    per-call costs of about 40 us each on this project's CI host, which were most of a GPU
    training step's routing time at batch 32."""
    import inspect

    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, grad_v = make_inputs(case)
    dynamic_routing(u, W, bias, 3, backend="fused").backward(grad_v)  # first calls: registration, caches
    seen = []
    signature, redispatch = inspect.signature, torch._ops.OpOverload.redispatch
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: seen.append("signature") or signature(*a, **k))
    monkeypatch.setattr(
        torch._ops.OpOverload, "redispatch", lambda self, *a, **k: seen.append(str(self)) or redispatch(self, *a, **k)
    )
    dynamic_routing(u, W, bias, 3, backend="fused").backward(grad_v)
    assert seen == []
    # Recording the backward (create_graph=True) still goes through the layers that make its
    # derivative raise a clear error (test_double_backward_raises_clear_error).
    torch.autograd.grad(dynamic_routing(u, W, bias, 3, backend="fused"), u, grad_v, create_graph=True)
    assert seen != []


def test_reference_supports_double_backward():
    case = RoutingCase(batch=1, num_in=2, num_out=2, dim_out=2, dim_in=2)
    u, W, bias, grad_v = make_inputs(case)
    v = dynamic_routing(u, W, bias, 3, backend="reference")
    (grad_u,) = torch.autograd.grad(v, u, grad_v, create_graph=True)
    (grad_W,) = torch.autograd.grad(grad_u.sum(), W)
    assert torch.isfinite(grad_W).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_auto_uses_fused_kernel_on_cpu_for_every_dtype(dtype):
    assert capsnet.has_kernel("cpu", dtype)
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, grad_v = make_inputs(case, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        auto = run_routing(u, W, bias, grad_v, 3, backend="auto")
    fused = run_routing(u, W, bias, grad_v, 3, backend="fused")
    for name in fused:
        assert auto[name].dtype == dtype
        assert torch.equal(auto[name], fused[name])


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    # A device type without a kernel, simulated by hiding the CPU kernel.
    monkeypatch.setattr(capsnet_ops, "_warned_fallbacks", set())
    monkeypatch.setattr(_extension, "KERNEL_DEVICE_TYPES", frozenset())
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, _ = make_inputs(case, dtype=torch.float32, requires_grad=False)
    with pytest.warns(UserWarning, match="no fused routing kernel for device 'cpu'.*backend='reference'"):
        v = dynamic_routing(u, W, bias, 3, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        dynamic_routing(u, W, bias, 3, backend="auto")
    assert torch.equal(v, dynamic_routing(u, W, bias, 3, backend="reference"))
    with pytest.raises(RuntimeError, match="backend='fused' is unavailable.*no kernel for device 'cpu'"):
        dynamic_routing(u, W, bias, 3, backend="fused")


def test_fused_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_LOAD_ERROR", "No module named 'capsnet._C'")
    monkeypatch.setattr(_extension, "KERNEL_DEVICE_TYPES", frozenset())
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        dynamic_routing(u, W, bias, 3, backend="fused")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        dynamic_routing(u.to("meta"), W.to("meta"), bias.to("meta"), 3, backend="fused")


def test_unknown_backend_is_rejected():
    case = RoutingCase(batch=1, num_in=2, num_out=2, dim_out=2, dim_in=2)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        dynamic_routing(u, W, bias, 3, backend="cuda")


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_meta_device_uses_the_fake_kernels(backend):
    # Shapes without computation, forward and backward, and no fallback warning.
    case = RoutingCase(batch=4, num_in=5, num_out=3, dim_out=6, dim_in=2)
    u, W, bias, grad_v = (t.to("meta") for t in make_inputs(case, dtype=torch.float32, requires_grad=False))
    u.requires_grad_()
    W.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, c = dynamic_routing(u, W, bias, 3, return_couplings=True, backend=backend)
    assert v.device.type == "meta" and v.shape == (4, 3, 6) and c.shape == (4, 5, 3)
    grad_u, grad_W = torch.autograd.grad(v, (u, W), grad_v)
    assert grad_u.shape == u.shape and grad_W.shape == W.shape
