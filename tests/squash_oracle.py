"""An exact oracle for squash (Eq. 1) and its gradient, and the magnitudes to probe it at.

The oracle works in Python's ``decimal`` with 60 significant digits and an exponent range
far beyond float64's, on the exact values of the inputs (every float is a finite binary
fraction, which ``Decimal`` holds exactly), so nothing in it overflows, underflows or rounds
at the precision of any torch dtype; the result is rounded once, to float64 (correctly:
``float(Decimal)`` goes through the shortest-repr conversion, which rounds to nearest), and
tests compare against that rounded to the dtype under test.

    v = phi(n) s,                       n = |s|,  phi(n) = n / (1 + n^2)
    grad_s = phi g + n phi'(n) <e, g> e,   e = s / n,  n phi'(n) = phi (1 - n^2) / (1 + n^2)
"""

from __future__ import annotations

import decimal
import math

import torch

_CONTEXT = decimal.Context(prec=60, Emax=10**6, Emin=-(10**6))


def squash_and_grad_exact(s: list[float], g: list[float]) -> tuple[list[float], list[float], float]:
    """squash(s), the gradient of <squash(s), g> with respect to s (both rounded to float64),
    and the size of the gradient's two terms, ``max|phi g| + max|radial <e, g> e|`` (the
    scale its rounding errors are relative to: the terms cancel partly when g is nearly
    parallel to s)."""
    with decimal.localcontext(_CONTEXT):
        s_dec = [decimal.Decimal(x) for x in s]  # exact: a float is a binary fraction
        g_dec = [decimal.Decimal(x) for x in g]
        sq_norm = sum(x * x for x in s_dec)
        if sq_norm == 0:
            return [0.0] * len(s), [0.0] * len(s), 0.0
        norm = sq_norm.sqrt()
        phi = norm / (1 + sq_norm)
        radial = phi * (1 - sq_norm) / (1 + sq_norm)
        along = sum(x * y for x, y in zip(s_dec, g_dec)) / norm  # <e, g>
        v = [phi * x for x in s_dec]
        tangential = [phi * y for y in g_dec]
        radial_part = [radial * along * x / norm for x in s_dec]
        grad = [a + b for a, b in zip(tangential, radial_part)]
        term_scale = max(abs(a) for a in tangential) + max(abs(b) for b in radial_part)
        return [float(x) for x in v], [float(x) for x in grad], float(term_scale)


def squash_oracle(s: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise exact squash and gradient of ``s [rows, D]`` (any float dtype), in float64,
    and the scale of each row's gradient terms."""
    s64 = s.detach().to(torch.float64).cpu()
    g64 = g.detach().to(torch.float64).cpu()
    rows = [squash_and_grad_exact(a.tolist(), b.tolist()) for a, b in zip(s64, g64)]
    vs, grads, scales = zip(*rows)
    return (
        torch.tensor(vs, dtype=torch.float64),
        torch.tensor(grads, dtype=torch.float64),
        torch.tensor(scales, dtype=torch.float64),
    )


def magnitude_rows(dtype: torch.dtype, dim: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Capsules ``s [rows, dim]`` in ``dtype`` spanning every magnitude the dtype holds.

    Random directions with largest component 10^k for every k from -30 to 30 that the dtype
    can represent without its components underflowing to subnormals or its length overflowing,
    then the extremes: components at the largest finite value (so that |s| itself exceeds it),
    at half of it, at the smallest normal and the smallest subnormal, one huge component among
    tiny ones, and zero. Also returns a label per row for error reports.
    """
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []
    labels: list[str] = []

    def add(row: torch.Tensor, label: str) -> None:
        rows.append(row.to(dtype))
        labels.append(label)

    for k in range(-30, 31):
        scale = 10.0**k
        if scale < info.tiny or scale * math.sqrt(dim) > info.max:
            continue
        for direction in range(2):
            x = torch.randn(dim, generator=gen, dtype=torch.float64)
            add(x / x.abs().max() * scale, f"1e{k} #{direction}")
    add(torch.full((dim,), info.max, dtype=torch.float64), "all components max")
    add(torch.full((dim,), -info.max, dtype=torch.float64), "all components -max")
    x = torch.randn(dim, generator=gen, dtype=torch.float64)
    add(x / x.abs().max() * info.max, "largest component max")
    add(torch.full((dim,), info.max / 2, dtype=torch.float64), "all components max/2")
    add(torch.full((dim,), info.tiny, dtype=torch.float64), "all components smallest normal")
    add(torch.full((dim,), info.smallest_normal * info.eps, dtype=torch.float64), "all components smallest subnormal")
    one_big = torch.full((dim,), info.tiny, dtype=torch.float64)
    one_big[0] = info.max
    add(one_big, "one max component among smallest normals")
    add(torch.zeros(dim, dtype=torch.float64), "zero")
    return torch.stack(rows), labels


def upstream_gradient(rows: int, dim: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """A random upstream gradient of unit order, in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(dtype)


def compare_to_oracle(actual, oracle, dtype, rel_ulps, labels, row_scale=None):
    """Row-wise error of ``actual`` against ``oracle`` rounded to ``dtype``.

    The allowance per row is ``rel_ulps * eps * scale + 4 * smallest subnormal``, where
    ``scale`` is ``row_scale`` (the size of the terms summed, for the gradient) or the row's
    largest oracle component: normwise in each capsule, and results in the subnormal range
    carry an absolute rounding error of a subnormal ulp or two. A NaN where the oracle is
    finite (or the reverse) is an infinite error. Returns (max abs error, max error in eps of
    the row's scale, descriptions of the rows over the allowance).
    """
    info = torch.finfo(dtype)
    subnormal = info.smallest_normal * info.eps
    expected = oracle.to(dtype).to(torch.float64)  # the oracle rounded to the dtype under test
    actual = actual.detach().to(torch.float64).cpu()
    err = (actual - expected).abs()
    err = torch.where(torch.isnan(actual) != torch.isnan(expected), torch.inf, err.nan_to_num(0.0))
    if row_scale is None:
        row_scale = expected.abs().amax(dim=1)
    row_err = err.amax(dim=1)
    allowed = rel_ulps * info.eps * row_scale + 4 * subnormal
    in_eps = torch.clamp(row_err - 4 * subnormal, min=0) / (info.eps * row_scale).clamp_min(subnormal)
    bad = [
        f"{labels[i]}: max abs error {row_err[i].item():.3e}, scale {row_scale[i].item():.3e}, "
        f"{in_eps[i].item():.1f} eps"
        for i in range(len(labels))
        if not row_err[i] <= allowed[i]
    ]
    return row_err.max().item(), in_eps.max().item(), bad
