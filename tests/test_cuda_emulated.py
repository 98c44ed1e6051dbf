"""The CUDA kernels, run without a GPU on the CPU emulation of CUDA (``csrc/simt``).

The module built here compiles ``csrc/cuda/routing_kernel.cuh`` (the very kernels nvcc
compiles) and the CUDA launcher's host code (``csrc/cuda/routing_host.h``: checks, launch
plan, launch order) with g++ against ``csrc/simt/simt.h``, and runs every CUDA thread as a
fiber. Outputs and workspaces start as NaN and dynamic shared memory is poisoned, so a
kernel that reads something nobody wrote fails here; running under several thread and block
orders exposes a missing ``__syncthreads``; a divergent barrier raises instead of hanging.

The build (about a minute, once; ninja rebuilds only what changed) goes to
``$CAPSNET_SIMT_BUILD_DIR`` or ``~/.cache/capsnet/simt``, never into the repository.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

from capsnet.reference import dynamic_routing_reference, squash

REPO = pathlib.Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
KERNEL_SOURCE = CSRC / "cuda" / "routing_kernel.cuh"
SIMT_SOURCES = ["emulated_routing.cpp", "simt.cpp", "simt_selftest.cpp"]

# A kernel stuck in a loop fails the run (pytest-timeout's thread method ends the process)
# instead of hanging CI; a divergent barrier already raises. The one-time build, in the
# module fixture, is not counted (func_only).
pytestmark = pytest.mark.timeout(180, method="thread", func_only=True)

CAPSNET = dict(num_in=1152, num_out=10, dim_out=16, dim_in=8)


def _build_directory() -> str:
    root = os.environ.get("CAPSNET_SIMT_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "capsnet", "simt"
    )
    path = os.path.join(root, f"torch-{torch.__version__}")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def simt():
    from torch.utils.cpp_extension import load

    return load(
        name="capsnet_simt",
        sources=[str(CSRC / "simt" / name) for name in SIMT_SOURCES],
        extra_include_paths=[str(CSRC), str(CSRC / "simt")],
        # C++20 for std::source_location; the kernels' `#pragma unroll` means nothing to g++.
        extra_cflags=["-O2", "-std=c++20", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
        build_directory=_build_directory(),
    )


# ---------------------------------------------------------------------------------------
# Oracles and comparison.
# ---------------------------------------------------------------------------------------
def make_inputs(batch, num_in, num_out, dim_out, dim_in, dtype, *, seed=0, weight_scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, num_in, dim_in, dtype=dtype, generator=generator)
    W = weight_scale * torch.randn(num_in, num_out, dim_out, dim_in, dtype=dtype, generator=generator)
    bias = 0.1 * torch.randn(num_out, dim_out, dtype=dtype, generator=generator)
    grad_v = torch.randn(batch, num_out, dim_out, dtype=dtype, generator=generator)
    return u, W, bias, grad_v


def reference_states(u, W, bias, num_iterations):
    """The op's saved state, following DESIGN.md: s_saved [B, r, N_out, D_out] (s of every
    iteration, before squash) and couplings [B, r, N_out, N_in] (c of every iteration)."""
    u_hat = torch.einsum("ijde,bie->bijd", W, u)
    logits = u.new_zeros(u.shape[0], W.shape[0], W.shape[1])
    states, couplings = [], []
    for k in range(num_iterations):
        c = torch.softmax(logits, dim=2)
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1) + (0 if bias is None else bias)
        states.append(s)
        couplings.append(c.transpose(1, 2))
        logits = logits + (u_hat * squash(s).unsqueeze(1)).sum(dim=-1)
    return torch.stack(states, dim=1), torch.stack(couplings, dim=1)


def reference_outputs(u, W, bias, grad_v, num_iterations):
    """(v, s_saved, couplings, grad_u, grad_W, grad_bias) in float64. grad_bias is the
    gradient for a zero bias when bias is None (the op always returns it)."""
    u64 = u.double().requires_grad_()
    W64 = W.double().requires_grad_()
    b64 = (torch.zeros(W.shape[1], W.shape[2], dtype=torch.float64) if bias is None else bias.double())
    b64.requires_grad_()
    v = dynamic_routing_reference(u64, W64, b64, num_iterations)
    grads = torch.autograd.grad(v, [u64, W64, b64], grad_v.double())
    with torch.no_grad():
        s_saved, couplings = reference_states(u64, W64, b64, num_iterations)
    return (v.detach(), s_saved, couplings, *grads)


OUTPUT_NAMES = ("v", "s_saved", "couplings", "grad_u", "grad_W", "grad_bias")


def assert_matches(actual, expected, dtype):
    """Relative to each tensor's magnitude: float64 to ~1e-12, float32 to what 24-bit
    mantissas give over sums of ~10^4 terms."""
    rtol, atol_scale = (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 2e-5)
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
        torch.testing.assert_close(
            a.double(), e, rtol=rtol, atol=atol_scale * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def run_emulated(simt, u, W, bias, grad_v, num_iterations, **options):
    v, s_saved, couplings = simt.routing_forward(u, W, bias, num_iterations, **options)
    grads = simt.routing_backward(grad_v, u, W, s_saved, couplings, **options)
    return (v, s_saved, couplings, *grads)


# ---------------------------------------------------------------------------------------
# Against the reference.
# ---------------------------------------------------------------------------------------
# (B, N_in, N_out, D_out, D_in, r, bias, multiprocessor_count): each line says what it covers.
SMALL_SHAPES = [
    (2, 5, 3, 4, 8, 3, True, 132),  # CapsNet tile (D_in = 8), one chunk
    (3, 7, 4, 5, 3, 2, False, 132),  # generic tile
    (1, 1, 1, 1, 1, 1, True, 132),  # every size 1: softmax over one capsule
    (2, 33, 3, 20, 8, 4, True, 1),  # D_out > 16 with D_in = 8: generic tile; 3 chunks of 16
    (2, 9, 2, 32, 32, 2, True, 132),  # the largest dimensions; grad_u in two shared-memory rounds
    (2, 17, 40, 3, 2, 3, False, 132),  # N_out > 32: fewer samples per block
    (37, 20, 3, 4, 8, 2, True, 2),  # B > 32: two sample tiles, the second with 27 idle lanes
    (5, 50, 6, 7, 8, 5, True, 3),  # r = 5; N_in not a multiple of the chunk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "B{}-I{}-J{}-D{}-E{}-r{}-bias{}-sm{}".format(*s))
def test_small_shapes_match_reference(simt, shape, dtype):
    batch, num_in, num_out, dim_out, dim_in, r, with_bias, sm_count = shape
    u, W, bias, grad_v = make_inputs(batch, num_in, num_out, dim_out, dim_in, dtype)
    bias = bias if with_bias else None
    actual = run_emulated(simt, u, W, bias, grad_v, r, multiprocessor_count=sm_count)
    assert_matches(actual, reference_outputs(u, W, bias, grad_v, r), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch, r", [(1, 1), (2, 2), (3, 3), (1, 3), (3, 1)])
def test_capsnet_shape_matches_reference(simt, batch, r, with_bias, dtype):
    u, W, bias, grad_v = make_inputs(batch, **CAPSNET, dtype=dtype, weight_scale=0.05)
    bias = bias if with_bias else None
    actual = run_emulated(simt, u, W, bias, grad_v, r)
    assert_matches(actual, reference_outputs(u, W, bias, grad_v, r), dtype)


def test_tests_cover_both_tile_classes(simt):
    tiles = {
        simt.describe_plan(b, i, j, d, e, r, 4, sm)["tile"] for b, i, j, d, e, r, _, sm in SMALL_SHAPES
    }
    tiles.add(simt.describe_plan(3, *CAPSNET.values(), 3, 4)["tile"])
    assert tiles == {"CapsNetTile", "GenericTile"}


def test_every_kernel_is_emulated(simt):
    kernel_pattern = r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)"
    declared = set(re.findall(kernel_pattern, KERNEL_SOURCE.read_text()))
    assert len(declared) >= 6, f"could not parse the kernels of {KERNEL_SOURCE}: {declared}"
    simt.clear_launch_log()
    for shape in [(3, 40, 10, 16, 8), (3, 40, 4, 5, 3)]:  # CapsNet tile, generic tile
        u, W, bias, grad_v = make_inputs(*shape, dtype=torch.float32)
        run_emulated(simt, u, W, bias, grad_v, 3)
    launched = set(simt.launch_log())
    assert launched == declared, f"never launched: {declared - launched}; unknown: {launched - declared}"


def test_launch_order(simt):
    u, W, bias, grad_v = make_inputs(2, 20, 3, 4, 8, dtype=torch.float32)
    simt.clear_launch_log()
    run_emulated(simt, u, W, bias, grad_v, 3)
    forward = ["forward_partial_sums_kernel", "forward_squash_kernel"] * 3
    backward = (
        ["backward_squash_kernel"]
        + ["backward_partial_sums_kernel", "backward_squash_kernel"] * 2
        + ["grad_weight_kernel", "grad_input_kernel"]
    )
    assert simt.launch_log() == forward + backward


# ---------------------------------------------------------------------------------------
# Determinism, data races, layouts, edge cases.
# ---------------------------------------------------------------------------------------
SCHEDULES = [("ascending", 0), ("descending", 0), ("shuffled", 1), ("shuffled", 2)]


@pytest.mark.parametrize("shape", [(3, 1152, 10, 16, 8), (3, 40, 4, 5, 3), (37, 20, 3, 4, 8)], ids=str)
def test_bitwise_identical_under_every_schedule(simt, shape):
    """Threads and blocks in other orders give the same bits: no thread reads shared or
    global memory before the barrier that orders it after its write (a missing barrier makes
    some order read a stale or NaN value), and every sum has a fixed order."""
    u, W, bias, grad_v = make_inputs(*shape, dtype=torch.float32, weight_scale=0.05)
    runs = [run_emulated(simt, u, W, bias, grad_v, 3, schedule=s, seed=seed) for s, seed in SCHEDULES]
    for (schedule, seed), run in zip(SCHEDULES[1:], runs[1:]):
        for name, first, other in zip(OUTPUT_NAMES, runs[0], run):
            assert torch.equal(first, other), f"{name} differs between ascending and {schedule} (seed {seed})"
    assert not any(torch.isnan(t).any() for t in runs[0])


def test_non_contiguous_and_misaligned_inputs(simt):
    u, W, bias, grad_v = make_inputs(2, 24, 3, 4, 8, dtype=torch.float32)
    expected = run_emulated(simt, u, W, bias, grad_v, 3)
    # A transposed u, and a W that starts one float into its storage (not 16-byte aligned,
    # which the CapsNet tile's vector loads need: the host copies it).
    u_strided = u.transpose(0, 1).contiguous().transpose(0, 1)
    W_misaligned = torch.empty(W.numel() + 1, dtype=W.dtype)[1:].view_as(W).copy_(W)
    assert W_misaligned.is_contiguous() and W_misaligned.data_ptr() % 16 != 0
    bias_strided = bias.t().contiguous().t()
    grad_v_strided = grad_v.transpose(1, 2).contiguous().transpose(1, 2)
    actual = run_emulated(simt, u_strided, W_misaligned, bias_strided, grad_v_strided, 3)
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert torch.equal(a, e), name


def test_empty_batch(simt):
    u, W, bias, _ = make_inputs(0, 6, 3, 4, 8, dtype=torch.float32)
    v, s_saved, couplings = simt.routing_forward(u, W, bias, 3)
    assert v.shape == (0, 3, 4) and s_saved.shape == (0, 3, 3, 4) and couplings.shape == (0, 3, 3, 6)
    grad_u, grad_W, grad_bias = simt.routing_backward(torch.zeros(0, 3, 4), u, W, s_saved, couplings)
    assert grad_u.shape == u.shape
    assert torch.equal(grad_W, torch.zeros_like(W)) and torch.equal(grad_bias, torch.zeros_like(bias))


def test_zero_input_gives_zero_output_and_finite_gradients(simt):
    """s = 0 is squash's singular point: v = 0 and a finite (zero-limit) gradient, like the reference."""
    _, W, _, grad_v = make_inputs(2, 10, 3, 4, 8, dtype=torch.float64)
    u = torch.zeros(2, 10, 8, dtype=torch.float64)
    actual = run_emulated(simt, u, W, None, grad_v, 3)
    assert torch.equal(actual[0], torch.zeros_like(actual[0]))
    assert all(torch.isfinite(t).all() for t in actual)
    assert_matches(actual, reference_outputs(u, W, None, grad_v, 3), torch.float64)


def test_large_agreements_do_not_overflow_the_softmax(simt):
    """Logits of several hundred (exp overflows float32 above ~88): max-subtracted softmax."""
    u, W, bias, grad_v = make_inputs(2, 30, 4, 16, 8, dtype=torch.float32, weight_scale=3.0)
    actual = run_emulated(simt, u, W, bias, grad_v, 3)
    expected = reference_outputs(u, W, bias, grad_v, 3)
    assert all(torch.isfinite(t).all() for t in actual)
    assert_matches(actual, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_cpu_kernel(simt, dtype):
    import capsnet

    assert capsnet.has_kernel("cpu", dtype), "capsnet._C has no CPU kernel: build the extension"
    u, W, bias, grad_v = make_inputs(3, 100, 10, 16, 8, dtype=dtype, weight_scale=0.1)
    cpu_forward = torch.ops.capsnet.routing_forward(u, W, bias, 3)
    cpu_grads = torch.ops.capsnet.routing_backward(grad_v, u, W, *cpu_forward[1:])
    expected = [t.double() for t in (*cpu_forward, *cpu_grads)]
    assert_matches(run_emulated(simt, u, W, bias, grad_v, 3), expected, dtype)


# ---------------------------------------------------------------------------------------
# Argument checks and limits (the host code the CUDA launcher runs).
# ---------------------------------------------------------------------------------------
def test_unsupported_shapes_are_rejected_with_the_limit(simt):
    for shape, message in [
        ((1, 2, 3, 33, 4), r"D_out <= 32, got D_out = 33"),
        ((1, 2, 3, 4, 33), r"D_in <= 32, got D_in = 33"),
        ((1, 2, 1025, 1, 1), r"N_out <= 1024"),
    ]:
        u, W, bias, _ = make_inputs(*shape, dtype=torch.float32)
        with pytest.raises(RuntimeError, match=message):
            simt.routing_forward(u, W, None, 2)


def test_argument_errors_name_the_argument(simt):
    """The checks are those of every backend (csrc/routing_checks.h)."""
    u, W, bias, grad_v = make_inputs(2, 5, 3, 4, 8, dtype=torch.float32)
    cases = [
        ((u, W.double(), bias, 3), r"W must have the dtype of u"),
        ((u, W[:4], bias, 3), r"W must have shape \[N_in=5"),
        ((u, W, bias[:2], 3), r"bias must have shape \[N_out, D_out\] = \[3, 4\]"),
        ((u.int(), W, bias, 3), r"u must be float32 or float64"),
        ((u, W, bias, 0), r"num_iterations must be at least 1"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            simt.routing_forward(*args)
    _, s_saved, couplings = simt.routing_forward(u, W, bias, 3)
    with pytest.raises(RuntimeError, match=r"grad_v must have shape \[B, N_out, D_out\] = \[2, 3, 4\]"):
        simt.routing_backward(grad_v[:, :2], u, W, s_saved, couplings)
    with pytest.raises(RuntimeError, match=r"s_saved must have shape"):
        simt.routing_backward(grad_v, u, W, s_saved[:, :, :2], couplings)
    with pytest.raises(RuntimeError, match=r"couplings must have shape \[B, r, N_out, N_in\] = \[2, 3, 3, 5\]"):
        simt.routing_backward(grad_v, u, W, s_saved, couplings[..., :4])


# ---------------------------------------------------------------------------------------
# The emulator itself.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, seed", SCHEDULES)
def test_emulator_barrier_and_static_shared_memory(simt, schedule, seed):
    x = torch.arange(3 * 64, dtype=torch.float32).view(3, 64)
    assert torch.equal(simt.selftest_reverse_in_block(x, True, schedule, seed), x.flip(1))


def test_emulator_exposes_a_missing_barrier(simt):
    x = torch.arange(3 * 64, dtype=torch.float32).view(3, 64)
    results = [simt.selftest_reverse_in_block(x, False, s, seed) for s, seed in SCHEDULES]
    assert any(not torch.equal(r, x.flip(1)) for r in results)


def test_emulator_reports_divergent_barriers(simt):
    with pytest.raises(RuntimeError, match="will never reach"):
        simt.selftest_divergent_barrier()
    with pytest.raises(RuntimeError, match="different __syncthreads"):
        simt.selftest_mismatched_barriers()


def test_emulator_guards_dynamic_shared_memory(simt):
    with pytest.raises(RuntimeError, match="wrote past the end of its 64 bytes of dynamic shared memory"):
        simt.selftest_shared_overflow()
    assert torch.isnan(simt.selftest_read_unwritten_shared()).all()
