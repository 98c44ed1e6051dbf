"""Every CPU kernel variant this machine can run, and the choice between them.

The extension carries the CPU kernels compiled once per instruction set (csrc/cpu/kernels/)
and picks one when first used (csrc/cpu/kernel_dispatch.cpp); ``CAPSNET_CPU_KERNEL`` forces
one. The choice is made once per process, so each variant runs in a subprocess: there, the
fused-vs-reference and determinism tests run again against that variant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import capsnet

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
INFO = capsnet.build_info()
BUILT = INFO["cpu_kernels_built"]
SUPPORTED = INFO["cpu_kernels_supported"]


def _run_python(code: str, variant: str | None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("CAPSNET_CPU_KERNEL", None)
    if variant is not None:
        env["CAPSNET_CPU_KERNEL"] = variant
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_build_has_cpu_kernels_and_runs_one():
    assert BUILT, "capsnet._C was built without CPU kernel variants"
    assert SUPPORTED, f"this CPU runs none of the built variants {BUILT}: {INFO['cpu_kernel_reason']}"
    assert INFO["cpu_kernel"] in SUPPORTED
    if os.environ.get("CAPSNET_CPU_KERNEL", "auto") in ("", "auto"):
        assert INFO["cpu_kernel"] == SUPPORTED[-1], "without CAPSNET_CPU_KERNEL the best supported variant runs"


def test_build_info_describes_the_machine():
    for key in ("version", "torch", "cpu_model", "cpu_flags", "cpu_kernel_reason", "cuda_built", "threads"):
        assert key in INFO, key
    assert INFO["version"] == capsnet.__version__
    assert INFO["extension_loaded"] is True


@pytest.mark.parametrize("variant", SUPPORTED)
def test_forced_variant_imports_and_is_chosen(variant):
    result = _run_python(
        f"""
        import torch, capsnet
        info = capsnet.build_info()
        assert info["cpu_kernel"] == {variant!r}, info
        assert "CAPSNET_CPU_KERNEL={variant}" in info["cpu_kernel_reason"], info
        u, W = torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3)
        v = capsnet.dynamic_routing(u, W, backend="fused")
        torch.testing.assert_close(v, capsnet.dynamic_routing(u, W, backend="reference"))
        print("ok")
        """,
        variant,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


@pytest.mark.parametrize("variant", SUPPORTED)
def test_variant_matches_reference_and_is_deterministic(variant):
    """tests/test_fused_vs_reference.py and tests/test_determinism.py (CPU cases) against this variant."""
    env = dict(os.environ, CAPSNET_CPU_KERNEL=variant)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu and not large_shape",
         str(TESTS / "test_fused_vs_reference.py"), str(TESTS / "test_determinism.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"{variant}: {summary}")
    assert result.returncode == 0, f"variant {variant}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary, summary


def test_variants_agree_closely():
    """Different instruction sets may round differently, but only by float rounding."""
    code = """
        import torch, capsnet
        g = torch.Generator().manual_seed(0)
        u = torch.randn(3, 100, 8, generator=g)
        W = 0.05 * torch.randn(100, 10, 16, 8, generator=g)
        v = capsnet.dynamic_routing(u, W, backend="fused")
        torch.save(v, "{path}")
        """
    results = {}
    for variant in SUPPORTED:
        path = ROOT / "build" / f"variant-{variant}.pt"
        path.parent.mkdir(exist_ok=True)
        run = _run_python(code.format(path=path), variant)
        assert run.returncode == 0, run.stderr
        results[variant] = torch.load(path)
        path.unlink()
    for variant, v in results.items():
        torch.testing.assert_close(v, results[SUPPORTED[0]], atol=1e-6, rtol=1e-5, msg=f"{variant} vs {SUPPORTED[0]}")


@pytest.mark.parametrize(
    "value, message",
    [("avx3", "is not a CPU kernel variant of this build"), ("AVX2", "is not a CPU kernel variant of this build")]
    + [(name, "which this CPU lacks") for name in BUILT if name not in SUPPORTED],
)
def test_bad_or_unsupported_variant_is_a_clear_error_not_a_crash(value, message):
    result = _run_python(
        """
        import warnings, torch, capsnet
        assert not capsnet.has_kernel("cpu", torch.float32)
        assert capsnet.build_info()["cpu_kernel"] is None
        u, W = torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3)
        try:
            capsnet.dynamic_routing(u, W, backend="fused")
        except RuntimeError as error:
            print("fused:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            v = capsnet.dynamic_routing(u, W)  # auto: the reference, with a warning
        torch.testing.assert_close(v, capsnet.dynamic_routing(u, W, backend="reference"))
        print("auto:", caught[0].message)
        """,
        value,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"CAPSNET_CPU_KERNEL={value}" in result.stdout and message in result.stdout, result.stdout
    assert "fused:" in result.stdout and "auto:" in result.stdout, result.stdout
