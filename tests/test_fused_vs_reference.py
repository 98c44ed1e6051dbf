"""The fused op against the pure-PyTorch reference: values and every gradient."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import DEVICES
from routing_testing import RoutingCase, assert_close_report, make_inputs, run_routing


def _edge_cases():
    return [
        RoutingCase(1, 1, 1, 1, 1, iterations=1, with_bias=False),
        RoutingCase(1, 1, 1, 1, 1, iterations=3, with_bias=True),
        RoutingCase(1, 7, 1, 4, 3),  # N_out = 1: softmax is identically 1
        RoutingCase(3, 1, 5, 4, 3),  # N_in = 1
        RoutingCase(2, 6, 4, 1, 1),  # D = 1
        RoutingCase(2, 5, 3, 32, 32, iterations=2),  # largest capsules
        RoutingCase(2, 9, 10, 16, 8, iterations=5),  # CapsNet capsule sizes (specialised path)
        RoutingCase(2, 9, 10, 8, 8, iterations=4, with_bias=False),  # the other specialised path
        RoutingCase(2, 4, 3, 5, 2, iterations=10),
    ]


def _random_cases(count=14, seed=1234):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        cases.append(
            RoutingCase(
                batch=rng.randint(1, 5),
                num_in=rng.randint(1, 40),
                num_out=rng.randint(1, 12),
                dim_out=rng.randint(1, 20),
                dim_in=rng.randint(1, 12),
                iterations=rng.randint(1, 5),
                with_bias=rng.random() < 0.5,
            )
        )
    return cases


CASES = _edge_cases() + _random_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_matches_reference(case, dtype, device):
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device=device)
    expected = run_routing(u, W, bias, grad_v, case.iterations, backend="reference")
    actual = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close_report(actual[name], expected[name], f"{case} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_capsnet_shape(dtype, device):
    case = RoutingCase(batch=3, num_in=1152, num_out=10, dim_out=16, dim_in=8, iterations=3, with_bias=True)
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device=device)
    expected = run_routing(u, W, bias, grad_v, 3, backend="reference")
    actual = run_routing(u, W, bias, grad_v, 3, backend="fused")
    for name in expected:
        assert_close_report(actual[name], expected[name], f"{case} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    case = RoutingCase(batch=3, num_in=6, num_out=4, dim_out=5, dim_in=3, iterations=3)
    u, W, bias, grad_v = make_inputs(case, device=device, requires_grad=False)
    # Same values, other strides: u transposed in memory, W and bias strided slices.
    u_nc = u.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    W_big = torch.zeros(*W.shape[:-1], 2 * W.shape[-1], dtype=W.dtype, device=device)
    W_big[..., ::2] = W
    W_nc = W_big[..., ::2].detach().requires_grad_()
    bias_nc = bias.t().contiguous().t().requires_grad_()
    grad_v_nc = grad_v.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (u_nc.is_contiguous() or W_nc.is_contiguous() or bias_nc.is_contiguous())
    actual = run_routing(u_nc, W_nc, bias_nc, grad_v_nc, 3, backend="fused")
    u, W, bias = (x.requires_grad_() for x in (u, W, bias))
    expected = run_routing(u, W, bias, grad_v, 3, backend="reference")
    for name in expected:
        assert_close_report(actual[name], expected[name], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_gradcheck(with_bias, device):
    case = RoutingCase(batch=2, num_in=4, num_out=3, dim_out=3, dim_in=2, iterations=3, with_bias=with_bias)
    u, W, bias, _ = make_inputs(case, device=device)
    from capsnet import dynamic_routing

    inputs = (u, W) + ((bias,) if with_bias else ())

    def f(u, W, *maybe_bias):
        return dynamic_routing(u, W, maybe_bias[0] if maybe_bias else None, 3, backend="fused")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_zero_vectors_give_finite_results(dtype, device):
    # u = 0 makes every prediction and every s exactly 0: squash(0) must be 0 with gradient 0.
    case = RoutingCase(batch=2, num_in=5, num_out=3, dim_out=4, dim_in=3, iterations=3, with_bias=False)
    _, W, _, grad_v = make_inputs(case, dtype=dtype, device=device)
    u = torch.zeros(2, 5, 3, dtype=dtype, device=device, requires_grad=True)
    results = {
        backend: run_routing(u, W, None, grad_v, 3, backend=backend) for backend in ("reference", "fused")
    }
    for name, value in results["fused"].items():
        assert torch.isfinite(value).all(), f"{name} is not finite for zero input"
        assert_close_report(value, results["reference"][name], name)
    assert torch.equal(results["fused"]["v"], torch.zeros_like(results["fused"]["v"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_input_propagates_per_sample(bad_value, device):
    case = RoutingCase(batch=3, num_in=5, num_out=3, dim_out=4, dim_in=3, iterations=3, with_bias=False)
    u, W, _, grad_v = make_inputs(case, device=device, requires_grad=False)
    u[1, 2, 0] = bad_value
    u.requires_grad_()
    W.requires_grad_()
    result = run_routing(u, W, None, grad_v, 3, backend="fused")
    assert not torch.isfinite(result["v"][1]).all(), "a non-finite input must show in its sample's output"
    # Samples are routed independently: the others stay finite and match the reference.
    clean = [0, 2]
    expected = run_routing(u.detach()[clean].requires_grad_(), W, None, grad_v[clean], 3, backend="reference")
    assert_close_report(result["v"][clean], expected["v"], "v of clean samples")
    assert_close_report(result["grad_u"][clean], expected["grad_u"], "grad_u of clean samples")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    case = RoutingCase(batch=0, num_in=5, num_out=3, dim_out=4, dim_in=3)
    u, W, bias, grad_v = make_inputs(case, device=device)
    result = run_routing(u, W, bias, grad_v, 3, backend="fused")
    assert result["v"].shape == (0, 3, 4)
    assert torch.equal(result["grad_W"], torch.zeros_like(W))
    assert torch.equal(result["grad_bias"], torch.zeros_like(bias))
    assert result["grad_u"].shape == u.shape
