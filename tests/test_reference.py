"""The oracle checked too: the reference against a loop-by-loop transcription of DESIGN.md and
of every option, gradcheck/gradgradcheck, and detach_routing against its definition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from capsnet import dynamic_routing_reference, squash
from routing_testing import RoutingCase, make_inputs


def routing_by_loops(u, W, bias, num_iterations, *, leaky=False, logit_prior=None):
    """Procedure 1 of Sabour et al. (2017) with explicit Python loops over every index.

    ``leaky``: each input capsule's softmax gets an extra logit 0 whose coupling is dropped
    (Sec. 7); ``logit_prior``: the initial logits of every sample. Returns ``v`` and the last
    iteration's couplings ``c [B, N_in, N_out]``.
    """
    batch, num_in, dim_in = u.shape
    _, num_out, dim_out, _ = W.shape
    v_all = torch.zeros(batch, num_out, dim_out, dtype=u.dtype)
    c_all = torch.zeros(batch, num_in, num_out, dtype=u.dtype)
    for b in range(batch):
        u_hat = [[[sum(W[i, j, d, e] * u[b, i, e] for e in range(dim_in)) for d in range(dim_out)]
                  for j in range(num_out)] for i in range(num_in)]
        logits = [[0.0 if logit_prior is None else float(logit_prior[i, j]) for j in range(num_out)]
                  for i in range(num_in)]
        for t in range(num_iterations):
            c = []
            for i in range(num_in):
                exps = [math.exp(float(logits[i][j])) for j in range(num_out)]
                total = sum(exps) + (math.exp(0.0) if leaky else 0.0)
                c.append([x / total for x in exps])
            v = []
            for j in range(num_out):
                s = [sum(c[i][j] * u_hat[i][j][d] for i in range(num_in)) for d in range(dim_out)]
                if bias is not None:
                    s = [s[d] + bias[j, d] for d in range(dim_out)]
                sq = sum(float(x) ** 2 for x in s)
                v.append([sq / (1 + sq) * float(x) / math.sqrt(sq) for x in s])
            if t < num_iterations - 1:
                for i in range(num_in):
                    for j in range(num_out):
                        logits[i][j] += sum(float(u_hat[i][j][d]) * v[j][d] for d in range(dim_out))
        v_all[b] = torch.tensor(v, dtype=u.dtype)
        c_all[b] = torch.tensor(c, dtype=u.dtype)
    return v_all, c_all


def make_prior(case: RoutingCase, seed=5, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    prior = torch.randn(case.num_in, case.num_out, generator=gen, dtype=torch.float64)
    return prior.requires_grad_(requires_grad)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_reference_matches_loop_transcription(with_bias, iterations):
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2, iterations=iterations, with_bias=with_bias)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    expected, _ = routing_by_loops(u, W, bias, iterations)
    actual = dynamic_routing_reference(u, W, bias, iterations)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


# Every combination of the options that change values (leaky, logit_prior), each with
# detach_routing (values unchanged by definition) and return_couplings.
OPTION_GRID = list(itertools.product([False, True], [False, True], [False, True]))


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize(
    "leaky,with_prior,detach_routing", OPTION_GRID, ids=lambda x: str(x)
)
def test_reference_options_match_loop_transcription(leaky, with_prior, detach_routing, iterations):
    case = RoutingCase(batch=2, num_in=3, num_out=3, dim_out=2, dim_in=2, iterations=iterations)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    prior = make_prior(case) if with_prior else None
    expected_v, expected_c = routing_by_loops(u, W, bias, iterations, leaky=leaky, logit_prior=prior)
    v, c = dynamic_routing_reference(
        u, W, bias, iterations, leaky=leaky, logit_prior=prior, detach_routing=detach_routing,
        return_couplings=True,
    )
    torch.testing.assert_close(v, expected_v, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c, expected_c, atol=1e-12, rtol=1e-12)
    # return_couplings changes nothing else.
    alone = dynamic_routing_reference(
        u, W, bias, iterations, leaky=leaky, logit_prior=prior, detach_routing=detach_routing
    )
    assert torch.equal(alone, v)


@pytest.mark.parametrize("leaky", [False, True])
def test_first_couplings_are_uniform_without_prior(leaky):
    # All-zero logits: 1/J, or 1/(J + 1) with the leaky extra logit.
    case = RoutingCase(batch=2, num_in=4, num_out=5, dim_out=3, dim_in=2, iterations=1)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    _, c = dynamic_routing_reference(u, W, bias, 1, leaky=leaky, return_couplings=True)
    expected = 1.0 / (case.num_out + (1 if leaky else 0))
    torch.testing.assert_close(c, torch.full_like(c, expected), rtol=1e-15, atol=0)
    # Leaky couplings of a capsule sum to less than 1 (the rest went to "none of the above").
    sums = c.sum(dim=-1)
    assert (sums < 1).all() if leaky else torch.allclose(sums, torch.ones_like(sums))


def test_returned_couplings_are_not_differentiable():
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2)
    u, W, bias, _ = make_inputs(case)
    v, c = dynamic_routing_reference(u, W, bias, 3, return_couplings=True)
    assert v.requires_grad and not c.requires_grad


def test_logits_are_per_sample():
    # Routing one sample alone or inside a batch must give the same result: logits are
    # never shared across the batch.
    case = RoutingCase(batch=4, num_in=5, num_out=3, dim_out=4, dim_in=3)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    prior = make_prior(case)
    for options in ({}, {"leaky": True, "logit_prior": prior}):
        batched = dynamic_routing_reference(u, W, bias, 3, **options)
        for b in range(case.batch):
            alone = dynamic_routing_reference(u[b : b + 1], W, bias, 3, **options)
            torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-14, rtol=1e-14)


def test_squash_values_and_zero():
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    v = squash(s)
    # |s| = 5: squash = 25/26 * s/5
    torch.testing.assert_close(v[0], torch.tensor([3.0, 4.0], dtype=torch.float64) * 25 / 26 / 5)
    assert torch.equal(v[1], torch.zeros(2, dtype=torch.float64))
    (grad,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[1], torch.zeros(2, dtype=torch.float64))


GRADCHECK_OPTIONS = [
    dict(),
    dict(leaky=True),
    dict(logit_prior=True),
    dict(leaky=True, logit_prior=True),
    dict(return_couplings=True),
    dict(leaky=True, logit_prior=True, return_couplings=True),
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("options", GRADCHECK_OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_reference_gradcheck_and_gradgradcheck(options, with_bias):
    case = RoutingCase(batch=2, num_in=3, num_out=3, dim_out=2, dim_in=2, iterations=3, with_bias=with_bias)
    u, W, bias, _ = make_inputs(case)
    options = dict(options)
    inputs = [u, W] + ([bias] if with_bias else [])
    if options.pop("logit_prior", False):
        inputs.append(make_prior(case, requires_grad=True))

    def f(*tensors):
        u, W, *rest = tensors
        bias = rest.pop(0) if with_bias else None
        prior = rest.pop(0) if rest else None
        out = dynamic_routing_reference(u, W, bias, 3, logit_prior=prior, **options)
        return out[0] if options.get("return_couplings") else out

    assert torch.autograd.gradcheck(f, tuple(inputs))
    assert torch.autograd.gradgradcheck(f, tuple(inputs))


@pytest.mark.parametrize("iterations", [1, 2, 4])
@pytest.mark.parametrize("leaky,with_prior", [(False, False), (True, False), (False, True), (True, True)])
def test_detach_routing_gradient_is_the_frozen_coupling_gradient(leaky, with_prior, iterations):
    # The definition: the couplings of the last iteration are constants c, and
    # v = squash(sum_i c_ij u_hat_j|i + bias_j); gradients flow through that alone.
    case = RoutingCase(batch=3, num_in=4, num_out=3, dim_out=3, dim_in=2, iterations=iterations)
    u, W, bias, grad_v = make_inputs(case)
    prior = make_prior(case, requires_grad=True) if with_prior else None
    v = dynamic_routing_reference(u, W, bias, iterations, leaky=leaky, logit_prior=prior, detach_routing=True)
    grads = torch.autograd.grad(v, (u, W, bias), grad_v, retain_graph=True)

    with torch.no_grad():
        _, frozen_c = dynamic_routing_reference(
            u, W, bias, iterations, leaky=leaky, logit_prior=prior, return_couplings=True
        )
    u_hat = torch.einsum("ijde,bie->bijd", W, u)
    expected_v = squash((frozen_c.unsqueeze(-1) * u_hat).sum(dim=1) + bias)
    expected = torch.autograd.grad(expected_v, (u, W, bias), grad_v)
    torch.testing.assert_close(v, expected_v, rtol=1e-13, atol=1e-14)
    for name, actual, wanted in zip(("u", "W", "bias"), grads, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-13, msg=lambda m: f"grad_{name}: {m}")
    if prior is not None:
        # The prior only shapes the couplings, which are constants: it gets no gradient.
        v.backward(grad_v)
        assert prior.grad is None


def test_detach_routing_differs_from_the_true_gradient():
    # Guard against a detach_routing that does nothing: with r >= 2 the gradients differ.
    case = RoutingCase(batch=2, num_in=4, num_out=3, dim_out=3, dim_in=2, iterations=3)
    u, W, bias, grad_v = make_inputs(case)
    full = torch.autograd.grad(dynamic_routing_reference(u, W, bias, 3), (u, W), grad_v)
    detached = torch.autograd.grad(dynamic_routing_reference(u, W, bias, 3, detach_routing=True), (u, W), grad_v)
    for a, b in zip(full, detached):
        assert (a - b).abs().max() > 1e-3
