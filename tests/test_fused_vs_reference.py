"""The fused op against the pure-PyTorch reference: values and every gradient, every option."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from capsnet import dynamic_routing
from conftest import DEVICES
from routing_testing import (
    RoutingCase,
    assert_close_report,
    assert_results_close,
    make_inputs,
    make_prior,
    max_abs_error,
    run_routing,
)


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


# Every combination of the options, on shapes that reach the special paths: r = 1 (the last
# iteration is the first), N_out = 1, D_in = 8 (the specialised kernels), a partial block.
OPTION_CASES = [
    RoutingCase(2, 9, 10, 16, 8, iterations=3),
    RoutingCase(3, 37, 4, 5, 3, iterations=2, with_bias=False),
    RoutingCase(2, 5, 3, 4, 2, iterations=1),
    RoutingCase(1, 40, 7, 3, 5, iterations=4),
    RoutingCase(2, 6, 1, 3, 2, iterations=3),
]
OPTIONS = [
    dict(leaky=leaky, detach_routing=detach, with_prior=prior)
    for leaky, detach, prior in itertools.product([False, True], repeat=3)
]


def _options_id(options):
    names = [name for name, on in (("leaky", options["leaky"]), ("detach", options["detach_routing"]),
                                   ("prior", options["with_prior"])) if on]
    return "+".join(names) or "default"


def _run_with_options(case, options, dtype, device, backend, seed=0):
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device=device, seed=seed)
    prior = make_prior(case, dtype=dtype, device=device) if options["with_prior"] else None
    return run_routing(
        u, W, bias, grad_v, case.iterations, backend, leaky=options["leaky"],
        detach_routing=options["detach_routing"], logit_prior=prior, return_couplings=True,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("options", OPTIONS, ids=_options_id)
@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
def test_options_match_reference(case, options, dtype, device):
    """v, the last couplings, and the gradients of u, W, bias and logit_prior."""
    expected = _run_with_options(case, options, dtype, device, "reference")
    actual = _run_with_options(case, options, dtype, device, "fused")
    assert_results_close(actual, expected, f"{case} {_options_id(options)}")
    if options["detach_routing"] and options["with_prior"]:
        assert actual["grad_prior"] is None  # a constant under detach_routing


@pytest.mark.parametrize("device", DEVICES)
def test_couplings_are_a_distribution_over_outputs(device):
    case = RoutingCase(3, 20, 6, 4, 3, iterations=3)
    for leaky in (False, True):
        result = _run_with_options(case, dict(leaky=leaky, detach_routing=False, with_prior=True), torch.float64,
                                   device, "fused")
        c = result["couplings"]
        assert c.shape == (case.batch, case.num_in, case.num_out)
        assert (c > 0).all()
        row_sums = c.sum(dim=-1)
        if leaky:  # the dropped "none of the above" coupling takes the rest
            assert (row_sums < 1).all()
        else:
            torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=1e-12, rtol=0)


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
    prior = make_prior(case, device=device, requires_grad=False)
    prior_nc = prior.t().contiguous().t().requires_grad_()
    grad_v_nc = grad_v.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(t.is_contiguous() for t in (u_nc, W_nc, bias_nc, prior_nc))
    actual = run_routing(u_nc, W_nc, bias_nc, grad_v_nc, 3, backend="fused", logit_prior=prior_nc)
    u, W, bias, prior = (x.requires_grad_() for x in (u, W, bias, prior))
    expected = run_routing(u, W, bias, grad_v, 3, backend="reference", logit_prior=prior)
    assert_results_close(actual, expected, "non-contiguous")


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
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("with_prior", [False, True], ids=["no-prior", "prior"])
def test_fused_gradcheck_with_options(leaky, with_prior, device):
    # Not detach_routing: its backward is deliberately not the true gradient (compared with
    # the reference in test_options_match_reference instead).
    case = RoutingCase(batch=2, num_in=4, num_out=3, dim_out=3, dim_in=2, iterations=3)
    u, W, bias, _ = make_inputs(case, device=device)
    prior = make_prior(case, device=device) if with_prior else None
    inputs = (u, W, bias) + ((prior,) if with_prior else ())

    def f(u, W, bias, *maybe_prior):
        return dynamic_routing(
            u, W, bias, 3, leaky=leaky, logit_prior=maybe_prior[0] if maybe_prior else None, backend="fused"
        )

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[-1], dict(leaky=True, detach_routing=False, with_prior=True)],
                         ids=_options_id)
def test_half_precision_error_at_most_twice_the_reference_error(dtype, options, device):
    """The flash-attention criterion: on the same low-precision inputs, the fused op's error
    against a float64 computation is at most twice that of the reference run in the low
    precision itself (the fused op computes in float32 and rounds only its results)."""
    case = RoutingCase(batch=3, num_in=288, num_out=10, dim_out=16, dim_in=8, iterations=3)
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device=device, requires_grad=False)
    prior = make_prior(case, dtype=dtype, device=device, requires_grad=False) if options["with_prior"] else None

    def run(backend, to_dtype):
        inputs = [None if t is None else t.to(to_dtype).requires_grad_() for t in (u, W, bias, prior)]
        return run_routing(
            inputs[0], inputs[1], inputs[2], grad_v.to(to_dtype), case.iterations, backend,
            leaky=options["leaky"], detach_routing=options["detach_routing"], logit_prior=inputs[3],
            return_couplings=True,
        )

    exact = run("reference", torch.float64)
    reference = run("reference", dtype)
    fused = run("fused", dtype)
    for name, value in exact.items():
        if value is None:
            assert fused[name] is None and reference[name] is None
            continue
        assert fused[name].dtype == dtype, f"{name} must come back in {dtype}, got {fused[name].dtype}"
        fused_error = max_abs_error(fused[name], value)
        reference_error = max_abs_error(reference[name], value)
        print(f"{dtype} {_options_id(options)} {name}: fused error {fused_error:.3e}, "
              f"reference error {reference_error:.3e}, ratio {fused_error / reference_error:.3f}")
        assert fused_error <= 2 * reference_error, (
            f"{name}: fused {dtype} error {fused_error:.3e} exceeds twice the {dtype} reference's "
            f"{reference_error:.3e}"
        )


@pytest.mark.parametrize("device", DEVICES)
def test_large_shape_at_small_batch(device):
    """The shape of issue 9 (3,872 primary capsules to 196 classes), at B = 2."""
    case = RoutingCase(batch=2, num_in=3872, num_out=196, dim_out=16, dim_in=8, iterations=3)
    options = dict(leaky=False, detach_routing=False, with_prior=True)
    expected = _run_with_options(case, options, torch.float32, device, "reference")
    actual = _run_with_options(case, options, torch.float32, device, "fused")
    assert_results_close(actual, expected, f"{case} prior")


@pytest.mark.parametrize("device", DEVICES)
def test_inference_calls_give_the_values_of_recorded_calls(device):
    """Without anything to differentiate, dynamic_routing calls the op directly instead of
    through its autograd.Function: the same values, bit for bit, and nothing recorded."""
    case = RoutingCase(batch=3, num_in=9, num_out=4, dim_out=5, dim_in=3, iterations=3)
    u, W, bias, _ = make_inputs(case, dtype=torch.float32, device=device)
    prior = make_prior(case, dtype=torch.float32, device=device)
    u, W, bias, prior = (t.detach() for t in (u, W, bias, prior))
    recorded_inputs = [t.clone().requires_grad_() for t in (u, W, bias, prior)]
    recorded, recorded_c = dynamic_routing(*recorded_inputs[:3], 3, logit_prior=recorded_inputs[3], return_couplings=True)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        under_no_grad = dynamic_routing(u, W, bias, 3, logit_prior=prior, return_couplings=True)
    plain = dynamic_routing(u, W, bias, 3, logit_prior=prior, return_couplings=True)  # nothing requires grad
    for v, c in (under_no_grad, plain):
        assert v.grad_fn is None and not v.requires_grad
        assert torch.equal(v, recorded.detach()) and torch.equal(c, recorded_c)


def test_backward_in_several_chunks_matches_reference():
    """A shape whose CPU backward runs in three chunks of samples (48 MB of float64 phase-1
    planes per sample, at most 256 MB per chunk in csrc/cpu/routing_cpu.cpp): the later
    chunks add their grad W and grad prior to the first's."""
    case = RoutingCase(batch=12, num_in=3872, num_out=196, dim_out=4, dim_in=2, iterations=4)
    options = dict(leaky=False, detach_routing=False, with_prior=True)
    expected = _run_with_options(case, options, torch.float64, "cpu", "reference")
    actual = _run_with_options(case, options, torch.float64, "cpu", "fused")
    assert_results_close(actual, expected, f"{case} prior, several backward chunks")


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
    prior = make_prior(case, device=device)
    result = run_routing(u, W, bias, grad_v, 3, backend="fused", logit_prior=prior, return_couplings=True)
    assert result["v"].shape == (0, 3, 4)
    assert result["couplings"].shape == (0, 5, 3)
    assert torch.equal(result["grad_W"], torch.zeros_like(W))
    assert torch.equal(result["grad_bias"], torch.zeros_like(bias))
    assert torch.equal(result["grad_prior"], torch.zeros_like(prior))
    assert result["grad_u"].shape == u.shape
