"""capsnet.DynamicRouting, the reusable routing layer, and DigitCaps, CapsNet's use of it."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import capsnet
from capsnet import DigitCaps, DynamicRouting, default_weight_std, dynamic_routing


def test_parameters_follow_the_options():
    plain = DynamicRouting(6, 3, 4, 5)
    assert [name for name, _ in plain.named_parameters()] == ["weight"]
    full = DynamicRouting(6, 3, 4, 5, bias=True, learn_prior=True)
    shapes = {name: tuple(p.shape) for name, p in full.named_parameters()}
    assert shapes == {"weight": (6, 4, 5, 3), "bias": (4, 5), "logit_prior": (6, 4)}
    # bias and prior start at zero: uniform first couplings, no offset.
    assert torch.equal(full.bias, torch.zeros(4, 5)) and torch.equal(full.logit_prior, torch.zeros(6, 4))


@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach_routing", [False, True])
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_forward_is_dynamic_routing_with_the_layers_parameters(backend, detach_routing, leaky):
    torch.manual_seed(0)
    layer = DynamicRouting(
        6, 3, 4, 5, num_iterations=2, bias=True, learn_prior=True, leaky=leaky, detach_routing=detach_routing,
        backend=backend,
    ).double()
    with torch.no_grad():
        layer.bias.normal_()
        layer.logit_prior.normal_()
    u = torch.randn(3, 6, 3, dtype=torch.float64)
    v, c = layer(u, return_couplings=True)
    expected_v, expected_c = dynamic_routing(
        u, layer.weight, layer.bias, 2, leaky=leaky, detach_routing=detach_routing, logit_prior=layer.logit_prior,
        return_couplings=True, backend=backend,
    )
    assert torch.equal(v, expected_v) and torch.equal(c, expected_c)
    assert torch.equal(layer(u), v)
    # Every parameter that shapes the output gets a gradient (the prior only without
    # detach_routing, where the couplings are constants).
    v.pow(2).sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0
    if detach_routing:
        assert layer.logit_prior.grad is None
    else:
        assert layer.logit_prior.grad.abs().sum() > 0


def test_default_initialisation_gives_unit_first_iteration_input():
    # The documented derivation: for unit-variance inputs E|s_j|^2 = 1 at the first iteration.
    torch.manual_seed(0)
    for leaky in (False, True):
        layer = DynamicRouting(1152, 8, 10, 16, leaky=leaky)
        c0 = 1.0 / (10 + (1 if leaky else 0))
        assert layer.weight_std == pytest.approx(1.0 / (c0 * math.sqrt(1152 * 8 * 16)))
        assert layer.weight.std().item() == pytest.approx(layer.weight_std, rel=0.01)
        u = torch.randn(256, 1152, 8)
        with torch.no_grad():
            s = c0 * torch.einsum("ijde,bie->bjd", layer.weight, u)
        mean_sq_norm = s.pow(2).sum(-1).mean().item()
        # 2560 capsules, each |s|^2 ~ chi-square(16)/16 over W's draw: a few percent of noise.
        assert mean_sq_norm == pytest.approx(1.0, rel=0.1), mean_sq_norm
    assert default_weight_std(1152, 8, 10, 16) == pytest.approx(10 / math.sqrt(1152 * 8 * 16))


def test_weight_std_can_be_given_and_reset_parameters_uses_it():
    layer = DynamicRouting(50, 4, 3, 8, weight_std=0.5, bias=True)
    assert layer.weight.std().item() == pytest.approx(0.5, rel=0.1)
    with torch.no_grad():
        layer.bias.fill_(1.0)
    layer.reset_parameters()
    assert layer.weight.std().item() == pytest.approx(0.5, rel=0.1) and torch.equal(layer.bias, torch.zeros(3, 8))


def test_extra_repr_names_every_option():
    text = repr(DynamicRouting(6, 3, 4, 5, 2, bias=True, leaky=True, learn_prior=True, backend="reference"))
    for part in ("6x3D -> 4x5D", "num_iterations=2", "bias=True", "leaky=True", "detach_routing=False",
                 "learn_prior=True", "backend='reference'", "weight_std="):
        assert part in text, text


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(num_in=0), ValueError, r"num_in must be a positive int, got 0"),
        (dict(dim_out=2.0), ValueError, r"dim_out must be a positive int, got 2.0"),
        (dict(num_iterations=True), ValueError, r"num_iterations must be a positive int, got True"),
        (dict(backend="fast"), ValueError, r"backend must be one of \('auto', 'fused', 'reference'\), got 'fast'"),
        (dict(leaky=1), TypeError, r"leaky must be a bool, got 1"),
        (dict(learn_prior="yes"), TypeError, r"learn_prior must be a bool, got 'yes'"),
        (dict(weight_std=0.0), ValueError, r"weight_std must be positive, got 0.0"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, error, message):
    args = dict(num_in=6, dim_in=3, num_out=4, dim_out=5)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        DynamicRouting(**args)


def test_defaults_are_auto_everywhere():
    assert DynamicRouting(6, 3, 4, 5).backend == "auto"
    assert DigitCaps(6, 3, 4, 5).backend == "auto"
    for function in (capsnet.dynamic_routing, DynamicRouting.__init__, DigitCaps.__init__):
        assert inspect.signature(function).parameters["backend"].default == "auto", function


def test_digit_caps_is_the_capsnet_use_of_the_layer():
    # The constructor call of capsnet/model.py, positional and keyword.
    layer = DigitCaps(1152, 8, 10, 16, num_iterations=3, backend="reference", bias=True, weight_std=0.01)
    assert isinstance(layer, DynamicRouting)
    assert DigitCaps(1152, 8, 10, 16, 3, "reference", True, 0.02).weight_std == 0.02
    assert layer.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert not layer.leaky and not layer.detach_routing and layer.logit_prior is None
    # The state dict of earlier versions: weight and bias, same shapes; it loads unchanged.
    state = layer.state_dict()
    assert list(state) == ["weight", "bias"]
    assert state["weight"].shape == (1152, 10, 16, 8) and state["bias"].shape == (10, 16)
    other = DigitCaps(1152, 8, 10, 16, bias=True)
    other.load_state_dict({"weight": state["weight"].clone(), "bias": state["bias"].clone()})
    assert torch.equal(other.weight, layer.weight)


def test_digit_caps_without_bias_has_only_weight():
    assert list(DigitCaps(12, 8, 10, 16).state_dict()) == ["weight"]


def test_layer_in_a_model_with_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(DynamicRouting(6, 3, 4, 5, bias=True, learn_prior=True, leaky=True, backend="fused"))
    u = torch.randn(3, 6, 3, requires_grad=True)
    eager = model(u)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(u)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(compiled.sum(), list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
