"""torch.func transforms and forward-mode AD through the routing op.

What torch 2.14 does for a torch.library op with register_autograd (probed while writing
capsnet/ops.py): forward AD (jvp, jacfwd, torch.autograd.forward_ad) returns zero or missing
tangents without an error; grad, jacrev and vmap(grad) fail with "In order to use an
autograd.Function with functorch transforms ... it must override the setup_context
staticmethod". capsnet's answer, tested here: the fused backend supports grad, jacrev, vmap
and their compositions (per-sample gradients); forward-mode AD and second derivatives raise
an error naming backend='reference', which supports everything; never zeros.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import func

from capsnet import dynamic_routing
from routing_testing import RoutingCase, make_inputs

CASE = RoutingCase(batch=3, num_in=5, num_out=3, dim_out=4, dim_in=2, iterations=3)
OPTION_SETS = [
    {},
    {"leaky": True, "with_prior": True},
    {"detach_routing": True, "with_prior": True},
]


def _ids(options):
    return "-".join(options) or "default"


def _inputs(options):
    u, W, bias, grad_v = make_inputs(CASE, requires_grad=False)
    gen = torch.Generator().manual_seed(3)
    prior = torch.randn(CASE.num_in, CASE.num_out, generator=gen, dtype=torch.float64)
    return u, W, bias, prior if options.get("with_prior") else None, grad_v


def _routing(options, backend):
    opts = {k: v for k, v in options.items() if k != "with_prior"}

    def route(u, W, bias, prior):
        return dynamic_routing(u, W, bias, CASE.iterations, logit_prior=prior, backend=backend, **opts)

    return route


def _assert_same(fused, reference, name):
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("options", OPTION_SETS, ids=_ids)
def test_func_grad_matches_reference(options):
    u, W, bias, prior, grad_v = _inputs(options)
    argnums = (0, 1, 2) + ((3,) if prior is not None and not options.get("detach_routing") else ())

    def loss(backend):
        route = _routing(options, backend)
        return lambda u, W, bias, prior: (route(u, W, bias, prior) * grad_v).sum()

    fused = func.grad(loss("fused"), argnums=argnums)(u, W, bias, prior)
    reference = func.grad(loss("reference"), argnums=argnums)(u, W, bias, prior)
    for k, (a, b) in enumerate(zip(fused, reference)):
        _assert_same(a, b, f"grad of argument {argnums[k]}")


@pytest.mark.parametrize("options", OPTION_SETS, ids=_ids)
def test_func_jacrev_matches_reference(options):
    u, W, bias, prior, _ = _inputs(options)
    jacobians = {
        backend: func.jacrev(lambda W, u: _routing(options, backend)(u, W, bias, prior), argnums=(0, 1))(W, u)
        for backend in ("fused", "reference")
    }
    for a, b, name in zip(jacobians["fused"], jacobians["reference"], ("dv/dW", "dv/du")):
        _assert_same(a, b, name)


def test_vmap_over_inputs_and_over_weights_matches_reference():
    options = {"leaky": True, "with_prior": True}
    u, W, bias, prior, _ = _inputs(options)
    stacked_u = torch.stack([u, 2 * u, -u])  # [V, B, N_in, D_in]
    stacked_W = torch.stack([W, 0.5 * W])
    for backend_outputs in (
        {b: func.vmap(lambda u: _routing(options, b)(u, W, bias, prior))(stacked_u) for b in ("fused", "reference")},
        {b: func.vmap(lambda W: _routing(options, b)(u, W, bias, prior))(stacked_W) for b in ("fused", "reference")},
    ):
        _assert_same(backend_outputs["fused"], backend_outputs["reference"], "vmap")


@pytest.mark.parametrize("options", OPTION_SETS, ids=_ids)
def test_per_sample_gradients_with_vmap_of_grad(options):
    u, W, bias, prior, grad_v = _inputs(options)

    def per_sample(backend):
        route = _routing(options, backend)

        def loss(W, bias, u_one, grad_one):
            return (route(u_one.unsqueeze(0), W, bias, prior) * grad_one).sum()

        return func.vmap(func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(W, bias, u, grad_v)

    fused, reference = per_sample("fused"), per_sample("reference")
    for a, b, name in zip(fused, reference, ("per-sample grad W", "per-sample grad bias")):
        assert a.shape[0] == CASE.batch
        _assert_same(a, b, name)
    # And the per-sample gradients sum to the batch gradient.
    batch_grad_W = func.grad(lambda W: (_routing(options, "fused")(u, W, bias, prior) * grad_v).sum())(W)
    _assert_same(fused[0].sum(0), batch_grad_W, "sum of per-sample grad W")


def test_grad_of_vmap_matches_reference():
    u, W, bias, prior, grad_v = _inputs({})
    stacked_u = torch.stack([u, 3 * u])

    def loss(backend):
        return lambda W: func.vmap(lambda u: _routing({}, backend)(u, W, bias, None))(stacked_u).pow(2).sum()

    _assert_same(func.grad(loss("fused"))(W), func.grad(loss("reference"))(W), "grad(vmap)")


FORWARD_AD_MESSAGE = r"forward-mode AD.*backend='reference'"


def _forward_ad_cases(route, u, W, bias, prior):
    tangent = torch.ones_like(u)

    def dual(requires_grad, no_grad=False):
        with fwAD.dual_level():
            primal = u.clone().requires_grad_(requires_grad)
            if no_grad:
                with torch.no_grad():
                    out = route(fwAD.make_dual(primal, tangent), W, bias, prior)
            else:
                out = route(fwAD.make_dual(primal, tangent), W, bias, prior)
            return fwAD.unpack_dual(out).tangent

    return {
        "func.jvp": lambda: func.jvp(lambda u: route(u, W, bias, prior), (u,), (tangent,))[1],
        "func.jacfwd": lambda: func.jacfwd(lambda u: route(u, W, bias, prior))(u),
        "func.hessian": lambda: func.hessian(lambda W: route(u, W, bias, prior).sum())(W),
        "forward_ad": lambda: dual(False),
        "forward_ad, input requires grad": lambda: dual(True),
        "forward_ad under no_grad": lambda: dual(False, no_grad=True),
    }


@pytest.mark.parametrize(
    "transform",
    ["func.jvp", "func.jacfwd", "func.hessian", "forward_ad", "forward_ad, input requires grad", "forward_ad under no_grad"],
)
def test_forward_mode_through_fused_op_raises_naming_the_reference(transform):
    u, W, bias, prior, _ = _inputs({})
    with pytest.raises(RuntimeError, match=FORWARD_AD_MESSAGE):
        _forward_ad_cases(_routing({}, "fused"), u, W, bias, prior)[transform]()


@pytest.mark.parametrize("transform", ["forward_ad", "forward_ad, input requires grad", "forward_ad under no_grad", "func.jvp"])
def test_forward_mode_through_a_direct_op_call_raises_too(transform):
    def direct(u, W, bias, prior):
        return torch.ops.capsnet.routing_forward(u, W, bias, prior, 3, False, False, False)[0]

    u, W, bias, prior, _ = _inputs({})
    with pytest.raises(RuntimeError, match=FORWARD_AD_MESSAGE):
        _forward_ad_cases(direct, u, W, bias, prior)[transform]()


@pytest.mark.parametrize("options", OPTION_SETS, ids=_ids)
def test_forward_mode_through_the_reference_works(options):
    # What the error message recommends: the reference's JVP equals its reverse-mode Jacobian
    # applied to the tangent.
    u, W, bias, prior, _ = _inputs(options)
    route = _routing(options, "reference")
    tangent = torch.randn_like(u)
    _, jvp = func.jvp(lambda u: route(u, W, bias, prior), (u,), (tangent,))
    jacobian = func.jacrev(lambda u: route(u, W, bias, prior))(u)
    expected = torch.einsum("bjdnie,nie->bjd", jacobian, tangent)
    torch.testing.assert_close(jvp, expected, rtol=1e-10, atol=1e-12)
    hessian = func.hessian(lambda W: route(u, W, bias, prior).sum())(W)
    assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0


@pytest.mark.parametrize("transform", ["grad of grad", "jacrev of jacrev"])
def test_second_derivatives_through_fused_op_raise_naming_the_reference(transform):
    u, W, bias, prior, _ = _inputs({})
    route = _routing({}, "fused")

    def first(W):
        return func.grad(lambda W: route(u, W, bias, prior).sum())(W)

    with pytest.raises(RuntimeError, match=r"double backward.*backend='reference'"):
        if transform == "grad of grad":
            func.grad(lambda W: first(W).sum())(W)
        else:
            func.jacrev(func.jacrev(lambda W: route(u, W, bias, prior)))(W)


def test_torch_func_on_a_direct_op_call_names_the_public_function():
    u, W, bias, prior, _ = _inputs({})

    def loss(W):
        return torch.ops.capsnet.routing_forward(u, W, bias, None, 3, False, False, False)[0].sum()

    with pytest.raises(RuntimeError, match=r"capsnet\.dynamic_routing.*backend='reference'"):
        func.grad(loss)(W)
