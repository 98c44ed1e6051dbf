"""The oracle checked too: the reference against a loop-by-loop transcription of DESIGN.md."""

from __future__ import annotations

import math

import pytest
import torch

from capsnet import dynamic_routing_reference, squash
from routing_testing import RoutingCase, make_inputs


def routing_by_loops(u, W, bias, num_iterations):
    """Procedure 1 of Sabour et al. (2017) with explicit Python loops over every index."""
    batch, num_in, dim_in = u.shape
    _, num_out, dim_out, _ = W.shape
    v_all = torch.zeros(batch, num_out, dim_out, dtype=u.dtype)
    for b in range(batch):
        u_hat = [[[sum(W[i, j, d, e] * u[b, i, e] for e in range(dim_in)) for d in range(dim_out)]
                  for j in range(num_out)] for i in range(num_in)]
        logits = [[0.0] * num_out for _ in range(num_in)]
        for t in range(num_iterations):
            c = []
            for i in range(num_in):
                exps = [math.exp(float(logits[i][j])) for j in range(num_out)]
                c.append([x / sum(exps) for x in exps])
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
    return v_all


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_reference_matches_loop_transcription(with_bias, iterations):
    case = RoutingCase(batch=2, num_in=3, num_out=2, dim_out=3, dim_in=2, iterations=iterations, with_bias=with_bias)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    expected = routing_by_loops(u, W, bias, iterations)
    actual = dynamic_routing_reference(u, W, bias, iterations)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


def test_logits_are_per_sample():
    # Routing one sample alone or inside a batch must give the same result: logits are
    # never shared across the batch.
    case = RoutingCase(batch=4, num_in=5, num_out=3, dim_out=4, dim_in=3)
    u, W, bias, _ = make_inputs(case, requires_grad=False)
    batched = dynamic_routing_reference(u, W, bias, 3)
    for b in range(case.batch):
        alone = dynamic_routing_reference(u[b : b + 1], W, bias, 3)
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


@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_gradcheck(with_bias):
    case = RoutingCase(batch=2, num_in=3, num_out=3, dim_out=2, dim_in=2, iterations=3, with_bias=with_bias)
    u, W, bias, _ = make_inputs(case)
    inputs = (u, W) + ((bias,) if with_bias else ())

    def f(u, W, *maybe_bias):
        return dynamic_routing_reference(u, W, maybe_bias[0] if maybe_bias else None, 3)

    assert torch.autograd.gradcheck(f, inputs)
