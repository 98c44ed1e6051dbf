"""Helpers for the routing-op tests: random problems, running a backend, comparing results."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capsnet import dynamic_routing

# |actual - expected| <= ATOL_SCALE * max|expected| + RTOL * |expected|, per dtype. float64 is
# held to 1e-10 (the CPU kernel agrees to ~1e-15); float32 to a few hundred ulps of the
# largest value, which covers the different summation order over up to 1152 input capsules.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
}


@dataclass(frozen=True)
class RoutingCase:
    batch: int
    num_in: int
    num_out: int
    dim_out: int
    dim_in: int
    iterations: int = 3
    with_bias: bool = True

    def __str__(self) -> str:
        bias = "bias" if self.with_bias else "nobias"
        return (
            f"B{self.batch}-Nin{self.num_in}-Nout{self.num_out}-Dout{self.dim_out}"
            f"-Din{self.dim_in}-r{self.iterations}-{bias}"
        )


def make_inputs(case: RoutingCase, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    """Random u, W, bias and an upstream gradient for v, at scales where routing is not trivial."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)

    # W scaled so that |s| is of order 1: the squash and softmax are then in their curved regime.
    w_scale = 1.0 / (case.dim_in * case.num_in) ** 0.5 * 2.0
    u = randn(case.batch, case.num_in, case.dim_in)
    W = randn(case.num_in, case.num_out, case.dim_out, case.dim_in, scale=w_scale)
    bias = randn(case.num_out, case.dim_out, scale=0.3) if case.with_bias else None
    grad_v = randn(case.batch, case.num_out, case.dim_out)
    if requires_grad:
        u.requires_grad_()
        W.requires_grad_()
        if bias is not None:
            bias.requires_grad_()
    return u, W, bias, grad_v


def make_prior(case: RoutingCase, dtype=torch.float64, device="cpu", seed=1, requires_grad=True):
    """A random logit_prior [N_in, N_out] of order 1 (so that it shapes the couplings)."""
    gen = torch.Generator().manual_seed(seed)
    prior = torch.randn(case.num_in, case.num_out, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return prior.requires_grad_(requires_grad)


def run_routing(
    u, W, bias, grad_v, iterations, backend, *, leaky=False, detach_routing=False, logit_prior=None,
    return_couplings=False,
):
    """v and the gradients of (v * grad_v).sum() with respect to u, W (and bias, logit_prior).

    Keys: v, grad_u, grad_W, grad_bias (with a bias), grad_prior (with a prior; None when no
    gradient reaches it, as under detach_routing), couplings (with return_couplings).
    """
    out = dynamic_routing(
        u, W, bias, iterations, leaky=leaky, detach_routing=detach_routing, logit_prior=logit_prior,
        return_couplings=return_couplings, backend=backend,
    )
    v, couplings = out if return_couplings else (out, None)
    named = [("grad_u", u), ("grad_W", W), ("grad_bias", bias), ("grad_prior", logit_prior)]
    named = [(name, t) for name, t in named if t is not None]
    grads = torch.autograd.grad(v, [t for _, t in named], grad_v, allow_unused=True)
    result = {"v": v.detach()}
    result.update((name, grad) for (name, _), grad in zip(named, grads))
    if return_couplings:
        result["couplings"] = couplings
    return result


def assert_results_close(actual: dict, expected: dict, label: str, dtype=None):
    """Every entry of two run_routing results close (a None, no gradient, must match a None)."""
    assert actual.keys() == expected.keys(), f"{label}: {sorted(actual)} != {sorted(expected)}"
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, f"{label} {name}: expected no gradient, got a tensor"
        else:
            assert actual[name] is not None, f"{label} {name}: expected a gradient, got None"
            assert_close_report(actual[name], value, f"{label} {name}", dtype=dtype)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, name: str, dtype=None):
    """assert_close with dtype tolerances; the failure message gives max abs and rel error."""
    dtype = dtype or expected.dtype
    atol_scale, rtol = TOLERANCES[dtype]
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = atol_scale * max(scale, 1e-30)
    abs_err = (actual - expected).abs()
    max_abs = abs_err.max().item() if abs_err.numel() else 0.0
    max_rel = (abs_err / expected.abs().clamp_min(1e-30)).max().item() if abs_err.numel() else 0.0
    torch.testing.assert_close(
        actual,
        expected,
        atol=atol,
        rtol=rtol,
        msg=lambda _: (
            f"{name} ({dtype}): max abs error {max_abs:.3e}, max rel error {max_rel:.3e}, "
            f"max |expected| {scale:.3e}, allowed atol {atol:.3e} + rtol {rtol:.0e}"
        ),
    )
