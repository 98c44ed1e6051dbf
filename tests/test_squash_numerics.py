"""squash and its gradient at every magnitude, in every dtype, against an exact oracle.

The reference (``capsnet.functional.squash``) is checked directly, the fused kernels through
the op with one input and one output capsule, ``W = I`` and one iteration, where the op's
total input ``s`` is ``u`` itself (the coupling is exactly 1), ``v = squash(u)`` and
``grad_u = grad_s``. Then the op-level probes of issue 9: float32 gradients with inputs of
order 1e7, and capsules longer than 1.8e19 (where ``|s|^2`` overflows float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from capsnet import dynamic_routing
from capsnet.functional import squash
from routing_testing import RoutingCase, assert_close_report, make_inputs, run_routing
from squash_oracle import compare_to_oracle, magnitude_rows, squash_oracle, upstream_gradient

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f64", "f32", "bf16", "f16"]
# float64 capsules shorter than this lose the radial term of their gradient (see squash).
FLOAT64_GRADIENT_FLOOR = 1e-150


def _check(name, actual, oracle, dtype, rel_ulps, labels, row_scale=None):
    max_abs, max_eps, bad = compare_to_oracle(actual, oracle, dtype, rel_ulps, labels, row_scale)
    print(f"{name} {dtype}: max abs error {max_abs:.3e}, max {max_eps:.2f} eps of the row scale")
    assert not bad, f"{name} {dtype}: {len(bad)} rows over {rel_ulps} eps:\n" + "\n".join(bad)


def _gradient_rows(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose gradient the reference promises exact (all but float64's shortest)."""
    if dtype != torch.float64:
        return torch.ones(s.shape[0], dtype=torch.bool)
    return torch.linalg.vector_norm(s.to(torch.float64), dim=1) >= FLOAT64_GRADIENT_FLOOR


@pytest.mark.parametrize("dim", [16, 8, 2, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_squash_matches_exact_oracle(dtype, dim):
    s, labels = magnitude_rows(dtype, dim)
    g = upstream_gradient(s.shape[0], dim, dtype)
    v_exact, grad_exact, grad_scale = squash_oracle(s, g)

    s_in = s.clone().requires_grad_()
    v = squash(s_in)
    (grad,) = torch.autograd.grad(v, s_in, g)
    assert v.dtype == dtype and grad.dtype == dtype
    _check("reference squash", v, v_exact, dtype, 4, labels)
    rows = _gradient_rows(s, dtype)
    row_labels = [label for label, keep in zip(labels, rows) if keep]
    _check("reference squash gradient", grad[rows], grad_exact[rows], dtype, 8, row_labels, grad_scale[rows])
    # Forward mode: the Jacobian of squash is symmetric, so the JVP with tangent g equals the
    # gradient of <squash(s), g>.
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(squash(fwAD.make_dual(s, g))).tangent
    _check("reference squash jvp", tangent[rows], grad_exact[rows], dtype, 8, row_labels, grad_scale[rows])


def test_reference_float64_gradient_of_the_shortest_capsules_is_its_first_term():
    # The documented limit: below |s| ~ 1e-154 the second term of the gradient,
    # n phi'(n) <e, g> e, underflows; what remains is the first, phi(n) g, exact and finite.
    s, labels = magnitude_rows(torch.float64, 16)
    short = ~_gradient_rows(s, torch.float64) & (s.abs().amax(dim=1) > 0)
    assert short.sum() >= 2, labels
    s = s[short]
    g = upstream_gradient(s.shape[0], 16, torch.float64)
    s_in = s.clone().requires_grad_()
    (grad,) = torch.autograd.grad(squash(s_in), s_in, g)
    # Scaled by 2^1000 (exactly: a power of two), the capsules have ordinary lengths.
    scaled = s * 2.0**1000
    phi = torch.linalg.vector_norm(scaled, dim=1, keepdim=True) * 2.0**-1000  # phi(n) = n here
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, phi * g, rtol=1e-15, atol=1e-322)


def _fused_squash(s: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v = squash(s) and its gradient through the fused op: one input and one output capsule,
    W = I, one iteration, so that the op's s is u itself."""
    rows, dim = s.shape
    u = s.reshape(rows, 1, dim).clone().requires_grad_()
    W = torch.eye(dim, dtype=s.dtype).reshape(1, 1, dim, dim)
    v = dynamic_routing(u, W, None, 1, backend="fused")
    (grad_u,) = torch.autograd.grad(v, u, g.reshape(rows, 1, dim))
    return v.reshape(rows, dim), grad_u.reshape(rows, dim)


@pytest.mark.parametrize("dim", [16, 8, 2, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_squash_matches_exact_oracle(dtype, dim):
    s, labels = magnitude_rows(dtype, dim)
    g = upstream_gradient(s.shape[0], dim, dtype)
    v_exact, grad_exact, grad_scale = squash_oracle(s, g)
    v, grad = _fused_squash(s, g)
    assert v.dtype == dtype and grad.dtype == dtype
    # The kernels compute in the op-math type (float for float16/bfloat16, else the dtype
    # itself), so a few roundings per result: eps of the dtype when that is the input's own.
    _check("fused squash", v, v_exact, dtype, 8, labels)
    _check("fused squash gradient", grad, grad_exact, dtype, 16, labels, grad_scale)


LONG_CAPSULES = [2e19, 1e25, 1e30, 1e38, torch.finfo(torch.float32).max]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("length", LONG_CAPSULES, ids=lambda x: f"{x:.1e}")
def test_capsules_longer_than_float32_squares_give_unit_outputs(length, backend):
    # |s|^2 overflows float32 from |s| ~ 1.8e19: the answer is a unit vector, not NaN.
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(3, 1, 16, generator=gen, dtype=torch.float64)
    u = (direction / direction.abs().amax(dim=-1, keepdim=True) * length).to(torch.float32)
    W = torch.eye(16).reshape(1, 1, 16, 16)
    v = dynamic_routing(u.requires_grad_(), W, None, 1, backend=backend)
    assert torch.isfinite(v).all(), v
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, 1), rtol=2e-7, atol=0)
    expected_direction = (u.double() / u.double().norm(dim=-1, keepdim=True)).float().detach()
    torch.testing.assert_close(v, expected_direction, rtol=1e-6, atol=1e-7)
    (grad_u,) = torch.autograd.grad(v, u, torch.ones_like(v))
    assert torch.isfinite(grad_u).all(), grad_u


def _float32_error_report(actual: dict, expected: dict) -> str:
    lines = []
    for name in expected:
        scale = expected[name].abs().max().item()
        err = (actual[name].double() - expected[name]).abs().max().item()
        lines.append(f"{name}: max abs error {err:.3e} ({err / max(scale, 1e-300):.2e} of max |expected| {scale:.3e})")
    return "; ".join(lines)


def _large_input_probe(case: RoutingCase, u_scale: float):
    """float32 fused and float32 reference against the float64 reference on u * u_scale."""
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float64, requires_grad=False)
    u32 = (u * u_scale).float()
    W32, bias32, grad_v32 = W.float(), bias.float() if bias is not None else None, grad_v.float()
    # The float64 reference sees exactly the float32 inputs.
    exact = run_routing(
        u32.double().requires_grad_(), W32.double().requires_grad_(),
        bias32.double().requires_grad_() if bias32 is not None else None, grad_v32.double(), case.iterations, "reference",
    )

    def float32(backend):
        return run_routing(
            u32.clone().requires_grad_(), W32.clone().requires_grad_(),
            bias32.clone().requires_grad_() if bias32 is not None else None, grad_v32, case.iterations, backend,
        )

    return exact, float32("fused"), float32("reference")


@pytest.mark.parametrize("u_scale", [1e7, 1e9])
def test_float32_gradients_with_large_inputs_at_the_capsnet_shape(u_scale):
    # Issue 9: at u * 1e7 the fused float32 gradients were wrong by 57-67% (an overflow in
    # the squash backward), while the float32 reference stayed at 2e-7.
    case = RoutingCase(batch=2, num_in=1152, num_out=10, dim_out=16, dim_in=8, iterations=3, with_bias=True)
    exact, fused, reference = _large_input_probe(case, u_scale)
    print(f"u x {u_scale:.0e}, fused float32: {_float32_error_report(fused, exact)}")
    print(f"u x {u_scale:.0e}, reference float32: {_float32_error_report(reference, exact)}")
    for name in exact:
        assert_close_report(fused[name], exact[name], f"fused {name}", dtype=torch.float32)


SMALL_CASES = [
    RoutingCase(batch=2, num_in=5, num_out=3, dim_out=4, dim_in=3, iterations=2),
    RoutingCase(batch=3, num_in=7, num_out=4, dim_out=8, dim_in=4, iterations=3, with_bias=False),
    RoutingCase(batch=1, num_in=9, num_out=10, dim_out=16, dim_in=8, iterations=5),
]


@pytest.mark.parametrize("u_scale", [5e6, 1e7, 1e12])
@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_float32_gradients_with_large_inputs_at_small_shapes(case, u_scale):
    exact, fused, reference = _large_input_probe(case, u_scale)
    print(f"{case} u x {u_scale:.0e}, fused float32: {_float32_error_report(fused, exact)}")
    print(f"{case} u x {u_scale:.0e}, reference float32: {_float32_error_report(reference, exact)}")
    for name in exact:
        assert_close_report(fused[name], exact[name], f"fused {name}", dtype=torch.float32)
        assert_close_report(reference[name], exact[name], f"reference {name}", dtype=torch.float32)
