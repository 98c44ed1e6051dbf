"""The CUDA kernels, run without a GPU on the CPU emulation of CUDA (``csrc/simt``).

The module (``benchmarks/emulator.py`` builds it) compiles the very kernels nvcc compiles
(``csrc/cuda/routing_forward.cuh``, ``routing_backward.cuh``, ``routing_gradients.cuh``) and
the CUDA launcher's host code
(``csrc/cuda/routing_host.h``: checks, launch plan, launch order) with g++ against
``csrc/simt/simt.h``, and runs every CUDA thread as a fiber. Outputs and workspaces start as
NaN and shared memory is poisoned, so a kernel that reads something nobody wrote fails here;
running under several thread and block orders exposes a missing ``__syncthreads``; a
divergent barrier, a misaligned vector load or a block above a kernel's launch bound raises;
an access past the shared memory hits a guard page. ``make test-cuda-asan`` runs this file
with AddressSanitizer and UndefinedBehaviorSanitizer.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.emulator, when pytest is not run from the root

from benchmarks import emulator  # noqa: E402
from capsnet.reference import dynamic_routing_reference  # noqa: E402

CUDA_DIR = REPO / "csrc" / "cuda"
KERNEL_SOURCES = [CUDA_DIR / "routing_forward.cuh", CUDA_DIR / "routing_backward.cuh", CUDA_DIR / "routing_gradients.cuh"]

# A kernel stuck in a loop fails the run (pytest-timeout's thread method ends the process)
# instead of hanging CI; a divergent barrier already raises. The one-time build, in the
# module fixture, is not counted (func_only).
pytestmark = pytest.mark.timeout(300, method="thread", func_only=True)

CAPSNET = dict(num_in=1152, num_out=10, dim_out=16, dim_in=8)
OPTIONS = ("prior", "leaky", "detach")


@pytest.fixture(scope="module")
def simt():
    return emulator.load()


# ---------------------------------------------------------------------------------------
# Problems, oracle, comparison.
# ---------------------------------------------------------------------------------------
def make_inputs(batch, num_in, num_out, dim_out, dim_in, dtype, *, seed=0, weight_scale=0.5, prior=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=torch.float64, generator=generator)).to(dtype)

    u = randn(batch, num_in, dim_in)
    W = randn(num_in, num_out, dim_out, dim_in, scale=weight_scale)
    bias = randn(num_out, dim_out, scale=0.1)
    grad_v = randn(batch, num_out, dim_out)
    logit_prior = randn(num_in, num_out) if prior else None
    return u, W, bias, logit_prior, grad_v


OUTPUT_NAMES = ("v", "couplings", "grad_u", "grad_W", "grad_bias", "grad_prior")


def reference_outputs(u, W, bias, prior, grad_v, r, *, leaky=False, detach=False, dtype=torch.float64):
    """(v, couplings, grad_u, grad_W, grad_bias, grad_prior) of the reference, computed in
    `dtype`. grad_bias is the gradient for a zero bias when bias is None (the op always
    returns it); grad_prior is empty without a prior or with detach_routing, as the op's."""
    inputs = [u, W, torch.zeros(W.shape[1], W.shape[2]) if bias is None else bias, prior]
    inputs = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    v, c = dynamic_routing_reference(
        inputs[0], inputs[1], inputs[2], r, leaky=leaky, detach_routing=detach, logit_prior=inputs[3],
        return_couplings=True,
    )
    wrt = [t for t in inputs if t is not None]
    grads = list(torch.autograd.grad(v, wrt, grad_v.to(dtype), allow_unused=True))
    grad_prior = grads[3] if prior is not None and not detach else torch.empty(0, dtype=dtype)
    if grad_prior is None:
        grad_prior = torch.zeros_like(prior, dtype=dtype)
    return (v.detach(), c, grads[0], grads[1], grads[2], grad_prior)


def run_emulated(simt, u, W, bias, prior, grad_v, r, *, leaky=False, detach=False, max_coefficient_bytes=0, **launch):
    """Forward and backward; every chunk tree must leave its counters at zero (the next
    launch of the call relies on it)."""
    v, s_saved, couplings = simt.routing_forward(u, W, bias, prior, r, leaky, detach, True, **launch)
    assert not simt.last_counters().any(), "the forward left a chunk-tree counter non-zero"
    grad_u, grad_W, grad_bias, grad_prior, _ = simt.routing_backward(
        grad_v, u, W, prior, s_saved, leaky, detach, max_coefficient_bytes=max_coefficient_bytes, **launch)
    assert not simt.last_counters().any(), "the backward left a chunk-tree counter non-zero"
    assert s_saved.dtype == (torch.float64 if u.dtype == torch.float64 else torch.float32)
    return (v, couplings, grad_u, grad_W, grad_bias, grad_prior)


def assert_matches(actual, expected, dtype):
    """Relative to each tensor's magnitude: float64 to ~1e-12, float32 to what 24-bit
    mantissas give over sums of ~10^4 terms."""
    rtol, atol_scale = (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 2e-5)
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol_scale * scale, msg=lambda m, n=name: f"{n}: {m}")


def option_id(flags):
    return "-".join(name for name, on in zip(OPTIONS, flags) if on) or "default"


# ---------------------------------------------------------------------------------------
# Against the reference.
# ---------------------------------------------------------------------------------------
# (B, N_in, N_out, D_out, D_in, r, bias, multiprocessor_count): each line says what it covers.
SMALL_SHAPES = [
    (2, 5, 3, 16, 8, 3, True, 132),  # CapsNet tile (D_in = 8, D_out = 16), one chunk
    (3, 7, 4, 5, 3, 2, False, 132),  # generic tile
    (2, 5, 3, 4, 8, 3, True, 132),  # D_in = 8 but D_out = 4: generic tile
    (1, 1, 1, 1, 1, 1, True, 132),  # every size 1: coupling step over one capsule
    (2, 33, 3, 20, 8, 4, True, 1),  # D_out > 16 with D_in = 8: generic tile; 3 chunks of 16
    (2, 9, 2, 32, 32, 2, True, 132),  # the largest dimensions; grad_u in two shared-memory rounds
    (2, 17, 40, 3, 2, 3, False, 132),  # N_out > 32: fewer samples per block
    (3, 10, 13, 16, 8, 2, True, 132),  # the CapsNet dimensions with N_out > 12: generic tile
    (37, 20, 3, 16, 8, 2, True, 2),  # B = 37: two sample tiles of 32, the second with 27 idle samples
    (5, 50, 6, 7, 8, 5, True, 3),  # r = 5; N_in not a multiple of the chunk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "B{}-I{}-J{}-D{}-E{}-r{}-bias{}-sm{}".format(*s))
def test_small_shapes_match_reference(simt, shape, dtype):
    batch, num_in, num_out, dim_out, dim_in, r, with_bias, sm_count = shape
    u, W, bias, _, grad_v = make_inputs(batch, num_in, num_out, dim_out, dim_in, dtype)
    bias = bias if with_bias else None
    actual = run_emulated(simt, u, W, bias, None, grad_v, r, multiprocessor_count=sm_count)
    assert_matches(actual, reference_outputs(u, W, bias, None, grad_v, r), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)), ids=option_id)
@pytest.mark.parametrize("shape", [(3, 21, 4, 16, 8, 2), (3, 7, 5, 5, 3, 132)], ids=["capsnet_tile", "generic_tile"])
def test_every_option_combination_matches_reference(simt, shape, flags, r, dtype):
    """logit_prior, leaky and detach_routing in all combinations: values, the returned
    couplings and every gradient (grad_prior included)."""
    prior, leaky, detach = flags
    *sizes, sm_count = shape
    u, W, bias, logit_prior, grad_v = make_inputs(*sizes, dtype=dtype, prior=prior)
    actual = run_emulated(simt, u, W, bias, logit_prior, grad_v, r, leaky=leaky, detach=detach, multiprocessor_count=sm_count)
    expected = reference_outputs(u, W, bias, logit_prior, grad_v, r, leaky=leaky, detach=detach)
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, r, with_bias", [(1, 1, True), (3, 3, False), (2, 3, True)])
def test_capsnet_shape_matches_reference(simt, batch, r, with_bias, dtype):
    u, W, bias, _, grad_v = make_inputs(batch, **CAPSNET, dtype=dtype, weight_scale=0.05)
    bias = bias if with_bias else None
    actual = run_emulated(simt, u, W, bias, None, grad_v, r)
    assert_matches(actual, reference_outputs(u, W, bias, None, grad_v, r), dtype)


def test_capsnet_shape_with_every_option(simt):
    u, W, bias, prior, grad_v = make_inputs(2, **CAPSNET, dtype=torch.float32, weight_scale=0.05, prior=True)
    for leaky, detach in [(True, False), (False, True)]:
        actual = run_emulated(simt, u, W, bias, prior, grad_v, 3, leaky=leaky, detach=detach)
        assert_matches(actual, reference_outputs(u, W, bias, prior, grad_v, 3, leaky=leaky, detach=detach), torch.float32)


def test_real_plan_structure(simt):
    """The structure of a production launch: full sample tiles (three of 32), several input
    chunks whose size is not a multiple of 8 and whose count is not a power of two (a chunk
    tree with single children), and several sample groups in the gradient kernel."""
    batch, num_in, sm_count = 96, 100, 9
    plan = simt.describe_plan(batch, num_in, 10, 16, 8, 3, 4, sm_count)
    assert plan["tile"] == "CapsNetTile" and batch % plan["samples_per_block"] == 0 and plan["sample_tiles"] >= 2, plan
    assert plan["num_chunks"] >= 3 and plan["inputs_per_chunk"] % 8 != 0, plan
    assert plan["num_chunks"] & (plan["num_chunks"] - 1) and plan["chunk_levels"] >= 2, plan
    assert plan["sample_groups"] >= 2, plan
    u, W, bias, prior, grad_v = make_inputs(batch, num_in, 10, 16, 8, torch.float32, weight_scale=0.2, prior=True)
    for leaky in (False, True):
        actual = run_emulated(simt, u, W, bias, prior, grad_v, 3, leaky=leaky, multiprocessor_count=sm_count)
        assert_matches(actual, reference_outputs(u, W, bias, prior, grad_v, 3, leaky=leaky), torch.float32)


def test_plan_choices_replace_the_planners(simt, monkeypatch):
    """CAPSNET_CUDA_PLAN (benchmarks/plan_sweep.py) sets the chunk size and the gradient
    kernel's sample groups; the results stay those of the reference whatever the plan."""
    batch, num_in, sm_count = 96, 100, 9
    default = simt.describe_plan(batch, num_in, 10, 16, 8, 3, 4, sm_count)
    u, W, bias, prior, grad_v = make_inputs(batch, num_in, 10, 16, 8, torch.float32, weight_scale=0.2, prior=True)
    expected = reference_outputs(u, W, bias, prior, grad_v, 3)
    for inputs, groups in [(7, 8), (1, 1)]:
        assert (inputs, groups) != (default["inputs_per_chunk"], default["sample_groups"])
        monkeypatch.setenv("CAPSNET_CUDA_PLAN", f"inputs_per_chunk={inputs},sample_groups={groups}")
        plan = simt.describe_plan(batch, num_in, 10, 16, 8, 3, 4, sm_count)
        assert (plan["inputs_per_chunk"], plan["num_chunks"], plan["sample_groups"]) == (inputs, -(-num_in // inputs), groups)
        assert_matches(run_emulated(simt, u, W, bias, prior, grad_v, 3, multiprocessor_count=sm_count), expected, torch.float32)
    # Out of what the shape allows: the nearest allowed value (N_in; a group per 4 samples).
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "inputs_per_chunk=5000,sample_groups=8")
    plan = simt.describe_plan(6, num_in, 10, 16, 8, 3, 4, sm_count)
    assert (plan["inputs_per_chunk"], plan["num_chunks"], plan["sample_groups"]) == (num_in, 1, 2)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "")
    assert simt.describe_plan(batch, num_in, 10, 16, 8, 3, 4, sm_count) == default


@pytest.mark.parametrize("batch, inputs", [(1, 9), (32, 9), (128, 18), (512, 72), (1024, 144)])
def test_the_planner_chunks_as_the_h200_timed(simt, monkeypatch, batch, inputs):
    """The chunk sizes of the fitted cost (routing_chunk_cost) on 132 SMs: at B <= 32 one
    block per SM (10 inputs per chunk took 0.82x the time of 5, two blocks per SM, on the
    H200); at B >= 128 the sizes that measured fastest, two blocks per SM."""
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "")
    plan = simt.describe_plan(batch, 1152, 10, 16, 8, 3, 4, 132)
    assert plan["inputs_per_chunk"] == inputs, plan
    blocks = plan["sample_tiles"] * plan["num_chunks"]
    assert blocks <= 132 if batch <= 32 else 132 < blocks <= 2 * 132, plan


def staged_launches(simt):
    """The forward launches since clear_launch_log() that read W and u through the InputRing."""
    return [name for name in simt.full_launch_log() if "forward_iteration" in name and "kInputRingSlots" in name]


# (batch, N_in, J, CAPSNET_CUDA_PLAN's other choices, SMs): several chunks with a short last
# one and idle samples in the last sample tile; chunks shorter than the ring (1 and 2
# inputs); the smallest staged block (J = 4: one u piece per thread, every thread copying).
STAGED_PROBLEMS = [(37, 100, 10, "", 9), (37, 20, 10, "inputs_per_chunk=1", 9), (40, 20, 10, "inputs_per_chunk=2", 9),
                   (33, 30, 4, "", 5)]


@pytest.mark.parametrize("problem", STAGED_PROBLEMS, ids=["chunks", "one-input-chunks", "two-input-chunks", "four-capsules"])
@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True)], ids=["default", "prior", "leaky"])
def test_staged_inputs_give_the_direct_loads_bits(simt, monkeypatch, problem, flags):
    """The forward kernels read W and u through a ring of shared-memory slots filled inputs
    ahead (routing_staging.cuh; the default plan). Under every thread and block order the
    outputs are bitwise those of the direct loads (staging_slots=0): each slot holds exactly
    what the direct loads would have read, and no copy lands in a slot that a thread still
    reads (on the emulator a copy lands at once, so a missing barrier shows as a difference)."""
    batch, num_in, num_out, other_choices, sm_count = problem
    prior, leaky = flags
    u, W, bias, logit_prior, grad_v = make_inputs(batch, num_in, num_out, 16, 8, torch.float32, weight_scale=0.2, prior=prior)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", ",".join(c for c in (other_choices, "staging_slots=0") if c))
    direct_plan = simt.describe_plan(batch, num_in, num_out, 16, 8, 3, 4, sm_count)
    assert direct_plan["staging_slots"] == 0, direct_plan
    simt.clear_launch_log()
    direct = run_emulated(simt, u, W, bias, logit_prior, grad_v, 3, leaky=leaky, multiprocessor_count=sm_count)
    assert staged_launches(simt) == [], simt.full_launch_log()
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", other_choices)
    plan = simt.describe_plan(batch, num_in, num_out, 16, 8, 3, 4, sm_count)
    assert plan["staging_slots"] == 3 and plan["inputs_per_chunk"] == direct_plan["inputs_per_chunk"], plan
    ring_bytes = 3 * (num_out * 16 * 8 + 32 * 12) * 4  # three slots: W slab + 32 padded u rows
    added = plan["launches"]["forward_iteration_kernel"]["shared_bytes"] - direct_plan["launches"]["forward_iteration_kernel"]["shared_bytes"]
    assert added == ring_bytes, plan
    for schedule, seed in SCHEDULES:
        simt.clear_launch_log()
        staged = run_emulated(simt, u, W, bias, logit_prior, grad_v, 3, leaky=leaky, schedule=schedule, seed=seed,
                              multiprocessor_count=sm_count)
        assert len(staged_launches(simt)) == 3, simt.full_launch_log()
        for name, a, e in zip(OUTPUT_NAMES, staged, direct):
            assert torch.equal(a, e), f"{name} differs from the direct loads' under the {schedule} order (seed {seed})"


SWEEP_FLAGS = [(False, False, False), (True, False, False), (False, True, False), (True, False, True)]


@pytest.mark.parametrize("problem", STAGED_PROBLEMS, ids=["chunks", "one-input-chunks", "two-input-chunks", "four-capsules"])
@pytest.mark.parametrize("flags", SWEEP_FLAGS, ids=["default", "prior", "leaky", "prior-detach"])
def test_the_sweeps_ring_gives_the_direct_loads_bits(simt, monkeypatch, problem, flags):
    """In the default plan every pass of the backward sweep (the first, the later ones, G_0's
    with a prior, detach_routing's couplings pass) reads W and u through an InputRing after
    its two kinds of thread rows, in a block past 48 KiB: under every thread and block order
    the outputs are bitwise those of its direct loads (sweep_staging_slots=0)."""
    batch, num_in, num_out, other_choices, sm_count = problem
    prior, leaky, detach = flags
    u, W, bias, logit_prior, grad_v = make_inputs(batch, num_in, num_out, 16, 8, torch.float32, weight_scale=0.2, prior=prior)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", ",".join(c for c in (other_choices, "sweep_staging_slots=0") if c))
    direct_plan = simt.describe_plan(batch, num_in, num_out, 16, 8, 3, 4, sm_count, prior, detach)
    assert direct_plan["sweep_staging_slots"] == 0, direct_plan
    direct = run_emulated(simt, u, W, bias, logit_prior, grad_v, 3, leaky=leaky, detach=detach, multiprocessor_count=sm_count)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", other_choices)
    plan = simt.describe_plan(batch, num_in, num_out, 16, 8, 3, 4, sm_count, prior, detach)
    assert plan["sweep_staging_slots"] == 3 and plan["inputs_per_chunk"] == direct_plan["inputs_per_chunk"], plan
    ring_bytes = 3 * (num_out * 16 * 8 + 32 * 12) * 4
    shared = plan["launches"]["backward_sweep_kernel"]["shared_bytes"]
    assert shared - direct_plan["launches"]["backward_sweep_kernel"]["shared_bytes"] == ring_bytes, plan
    passes = 1 if detach else 2 + (1 if prior else 0)  # detach_routing: no prior gradient
    for schedule, seed in SCHEDULES:
        simt.clear_launch_log()
        staged = run_emulated(simt, u, W, bias, logit_prior, grad_v, 3, leaky=leaky, detach=detach, schedule=schedule,
                              seed=seed, multiprocessor_count=sm_count)
        staged_passes = [n for n in simt.full_launch_log() if "backward_sweep" in n and "kInputRingSlots" in n]
        assert len(staged_passes) == passes, simt.full_launch_log()
        for name, a, e in zip(OUTPUT_NAMES, staged, direct):
            assert torch.equal(a, e), f"{name} differs from the direct loads' under the {schedule} order (seed {seed})"


def test_the_sweeps_ring_only_where_two_blocks_still_fit_an_sm(simt, monkeypatch):
    """The sweep's ring takes its block past 48 KiB: the planner gives it (by default, or
    when sweep_staging_slots=3 asks) only where an SM still holds the 2 blocks per SM that
    the chunk sizes assume (an H100's 228 KiB per SM: yes; sm_86's 100 KiB: no), and never
    where sweep_staging_slots=0 asks for the direct loads."""
    for choices in ("", "sweep_staging_slots=3"):
        monkeypatch.setenv("CAPSNET_CUDA_PLAN", choices)
        plan = simt.describe_plan(128, 1152, 10, 16, 8, 3)
        shared = plan["launches"]["backward_sweep_kernel"]["shared_bytes"]
        assert plan["sweep_staging_slots"] == 3 and 48 * 1024 < shared <= 227 * 1024, (choices, plan)
        fits = simt.describe_plan(128, 1152, 10, 16, 8, 3, shared_bytes_per_multiprocessor=2 * (shared + 1024))
        assert fits["sweep_staging_slots"] == 3, choices
        for per_sm in (2 * (shared + 1024) - 1, 100 * 1024):
            plan = simt.describe_plan(128, 1152, 10, 16, 8, 3, shared_bytes_per_multiprocessor=per_sm)
            assert plan["sweep_staging_slots"] == 0, (choices, per_sm)
            assert plan["launches"]["backward_sweep_kernel"]["shared_bytes"] <= 48 * 1024, (choices, per_sm)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "sweep_staging_slots=0")
    assert simt.describe_plan(128, 1152, 10, 16, 8, 3)["sweep_staging_slots"] == 0


def test_the_rings_are_the_default_only_with_async_copies(simt, monkeypatch):
    """Without cp.async (GPUs before sm_80) the rings' copies would go through registers and
    overlap nothing: the planner keeps the direct loads there, in the forward and in the
    sweep, unless staging_slots=3 or sweep_staging_slots=3 asks."""
    for key in ("staging_slots", "sweep_staging_slots"):
        monkeypatch.setenv("CAPSNET_CUDA_PLAN", "")
        assert simt.describe_plan(128, 1152, 10, 16, 8, 3, 4, 132)[key] == 3, key
        assert simt.describe_plan(128, 1152, 10, 16, 8, 3, 4, 40, async_copies=False)[key] == 0, key
        monkeypatch.setenv("CAPSNET_CUDA_PLAN", f"{key}=3")
        assert simt.describe_plan(128, 1152, 10, 16, 8, 3, 4, 40, async_copies=False)[key] == 3, key
        monkeypatch.setenv("CAPSNET_CUDA_PLAN", f"{key}=0")
        assert simt.describe_plan(128, 1152, 10, 16, 8, 3, 4, 132)[key] == 0, key


@pytest.mark.parametrize("case", ["float16", "float64", "three-capsules", "generic-tile"])
def test_staging_is_left_out_where_it_does_not_apply(simt, monkeypatch, case):
    """The ring holds float32 rows of the CapsNet tile with J >= 4; elsewhere the default
    plan and staging_slots=3 both plan and run the direct loads (with their results)."""
    dtype = {"float16": torch.float16, "float64": torch.float64}.get(case, torch.float32)
    shape = {"three-capsules": (5, 12, 3, 16, 8), "generic-tile": (5, 12, 10, 8, 8)}.get(case, (5, 12, 10, 16, 8))
    u, W, bias, _, _ = make_inputs(*shape, dtype)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "staging_slots=0")
    expected = simt.routing_forward(u, W, bias, None, 3, False, False, True)
    for choices in ("", "staging_slots=3", "staging_slots=3,sweep_staging_slots=3"):
        monkeypatch.setenv("CAPSNET_CUDA_PLAN", choices)
        plan = simt.describe_plan(*shape, 3, 8 if dtype == torch.float64 else 4, 132,
                                  float32_storage=dtype == torch.float32)
        assert plan["staging_slots"] == 0 and plan["sweep_staging_slots"] == 0, (choices, plan)
        simt.clear_launch_log()
        actual = simt.routing_forward(u, W, bias, None, 3, False, False, True)
        assert staged_launches(simt) == [] and "forward_iteration_kernel" in simt.launch_log()
        for name, a, e in zip(("v", "s_saved", "couplings"), actual, expected):
            assert torch.equal(a, e), (choices, name)


# (batch, N_in, flags (prior, leaky, detach), SMs): rounds with 1 to 3 of their 4 samples
# past a group's end (B = 37 and 5), several inputs and sample groups per block, a prior
# (dprior), leaky routing, detach_routing.
NARROW_PROBLEMS = [(37, 20, (True, False, False), 2), (5, 24, (False, True, False), 132), (64, 12, (True, True, True), 7)]


def plan_and_run(simt, monkeypatch, plan_text, problem, inputs, launched, **order):
    """The plan and the emulated forward+backward (r = 3) of a NARROW_PROBLEMS-style problem
    under CAPSNET_CUDA_PLAN=`plan_text` (and a thread and block `order`: schedule, seed),
    whose launches must include one naming `launched`."""
    batch, num_in, (prior, leaky, detach), sm_count = problem
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", plan_text)
    plan = simt.describe_plan(batch, num_in, 10, 16, 8, 3, 4, sm_count, prior, detach)
    simt.clear_launch_log()
    outputs = run_emulated(simt, *inputs, 3, leaky=leaky, detach=detach, multiprocessor_count=sm_count, **order)
    assert any(launched in name for name in simt.full_launch_log()), simt.full_launch_log()
    return plan, outputs


@pytest.mark.parametrize("problem", NARROW_PROBLEMS, ids=["prior-37", "leaky-5", "prior-leaky-detach-64"])
def test_narrow_gradient_rows_give_the_wide_kernels_bits(simt, monkeypatch, problem):
    """The default gradient kernel holds 4 rows of W[i, j] per thread and forms a round's
    dL/du_hat rows together; gradient_rows=8 holds 8 and forms them one sample at a time.
    dL/du_hat is summed the same way in both, so dW, dbias and dprior (and the forward) have
    the same bits under every thread and block order; dL/du adds twice the row groups'
    partials with 4 rows, so it matches to rounding, and is the same in every order."""
    batch, num_in, (prior, leaky, detach), sm_count = problem
    inputs = make_inputs(batch, num_in, 10, 16, 8, torch.float32, weight_scale=0.2, prior=prior)
    plan, wide = plan_and_run(simt, monkeypatch, "gradient_rows=8", problem, inputs, "kWideGradientRows")
    block = plan["launches"]["gradient_kernel"]["block"]
    assert plan["gradient_rows"] == 8 and block[0] * block[2] == 2 * 8 and block[1] == 10, plan
    expected = reference_outputs(*inputs, 3, leaky=leaky, detach=detach)
    grad_us = []
    for schedule, seed in SCHEDULES:
        plan, narrow = plan_and_run(simt, monkeypatch, "", problem, inputs, "kNarrowGradientRows", schedule=schedule, seed=seed)
        block = plan["launches"]["gradient_kernel"]["block"]
        assert plan["gradient_rows"] == 4 and block[0] * block[2] == 4 * 8 and block[1] == 10, plan
        for name, a, e in zip(OUTPUT_NAMES, narrow, wide):
            if name != "grad_u":
                assert torch.equal(a, e), f"{name} differs from the 8-row kernel's under the {schedule} order (seed {seed})"
        assert_matches(narrow, expected, torch.float32)
        grad_us.append(narrow[2])
    for (schedule, seed), grad_u in zip(SCHEDULES[1:], grad_us[1:]):
        assert torch.equal(grad_u, grad_us[0]), f"grad_u differs between the ascending and {schedule} orders (seed {seed})"


# As NARROW_PROBLEMS, and several rounds per sample group in blocks of two groups (B = 96).
LOADS_AHEAD_PROBLEMS = NARROW_PROBLEMS + [(96, 100, (True, False, False), 9)]


@pytest.mark.parametrize("problem", LOADS_AHEAD_PROBLEMS, ids=["prior-37", "leaky-5", "prior-leaky-detach-64", "prior-96"])
def test_gradient_loads_ahead_give_the_loads_at_use_bits(simt, monkeypatch, problem):
    """The default 4-row gradient kernel loads ahead: its product terms two at a time and
    the next round's u rows into shared memory. It reads the same values and adds them in
    the same order as the kernel that loads each where it is used (gradient_loads_ahead=0):
    every output has the same bits, under every thread and block order."""
    batch, num_in, (prior, leaky, detach), sm_count = problem
    inputs = make_inputs(batch, num_in, 10, 16, 8, torch.float32, weight_scale=0.2, prior=prior)
    at_use_plan, at_use = plan_and_run(simt, monkeypatch, "gradient_loads_ahead=0", problem, inputs,
                                       "kNarrowGradientRows, false>")
    assert not at_use_plan["gradient_loads_ahead"], at_use_plan
    # Two rounds of u rows (kRound x 8 (group, input) slots x E floats) more shared memory.
    staged_bytes = 2 * 4 * 8 * 8 * 4
    for schedule, seed in SCHEDULES:
        plan, ahead = plan_and_run(simt, monkeypatch, "", problem, inputs, "kNarrowGradientRows, true>",
                                   schedule=schedule, seed=seed)
        assert plan["gradient_loads_ahead"] and plan["gradient_rounds"] >= (2 if batch == 96 else 1), plan
        shared_bytes = plan["launches"]["gradient_kernel"]["shared_bytes"]
        assert shared_bytes == at_use_plan["launches"]["gradient_kernel"]["shared_bytes"] + staged_bytes, plan
        for name, a, e in zip(OUTPUT_NAMES, ahead, at_use):
            assert torch.equal(a, e), f"{name} differs from the loads at use under the {schedule} order (seed {seed})"


def test_half_storage_loads_ahead_whatever_the_plan_says(simt, monkeypatch):
    """The kernel that loads at use is compiled for float32 storage only; float16 storage
    keeps its loads ahead under gradient_loads_ahead=0, with the same results."""
    u, W, bias, _, grad_v = make_inputs(9, 12, 10, 16, 8, torch.float16)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "")
    expected = run_emulated(simt, u, W, bias, None, grad_v, 3)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "gradient_loads_ahead=0")
    assert simt.describe_plan(9, 12, 10, 16, 8, 3, 4, 132, float32_storage=False)["gradient_loads_ahead"]
    actual = run_emulated(simt, u, W, bias, None, grad_v, 3)
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert torch.equal(a, e), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["float16", "float64"])
def test_wide_gradient_rows_are_float32_only(simt, monkeypatch, dtype):
    """The 8-row gradient kernel is compiled for float32 storage; other storage runs its
    4-row kernel under gradient_rows=8 too, with its results."""
    u, W, bias, _, grad_v = make_inputs(5, 12, 10, 16, 8, dtype)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "")
    expected = run_emulated(simt, u, W, bias, None, grad_v, 3)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "gradient_rows=8")
    acc_bytes = 8 if dtype == torch.float64 else 4
    assert simt.describe_plan(5, 12, 10, 16, 8, 3, acc_bytes, 132, float32_storage=False)["gradient_rows"] == 4
    simt.clear_launch_log()
    actual = run_emulated(simt, u, W, bias, None, grad_v, 3)
    assert not any("kWideGradientRows" in name for name in simt.full_launch_log()), simt.full_launch_log()
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert torch.equal(a, e), name


@pytest.mark.parametrize("text, message", [
    ("chunk=4", "CAPSNET_CUDA_PLAN: unknown choice 'chunk' in 'chunk=4'"),
    ("inputs_per_chunk=four", "CAPSNET_CUDA_PLAN: inputs_per_chunk must be an integer, got 'four'"),
    ("inputs_per_chunk", "CAPSNET_CUDA_PLAN: inputs_per_chunk must be an integer, got ''"),
    ("inputs_per_chunk=0", "CAPSNET_CUDA_PLAN: inputs_per_chunk must be >= 1, got 0"),
    ("inputs_per_chunk=4,sample_groups=3", "CAPSNET_CUDA_PLAN: sample_groups must be 1, 2, 4 or 8, got 3"),
    ("staging_slots=2", "CAPSNET_CUDA_PLAN: staging_slots must be 0 or 3, got 2"),
    ("gradient_rows=2", "CAPSNET_CUDA_PLAN: gradient_rows must be 8 or 4, got 2"),
    ("sweep_staging_slots=1", "CAPSNET_CUDA_PLAN: sweep_staging_slots must be 0 or 3, got 1"),
    ("gradient_loads_ahead=2", "CAPSNET_CUDA_PLAN: gradient_loads_ahead must be 0 or 1, got 2"),
])
def test_bad_plan_choices_are_refused_with_their_name(simt, monkeypatch, text, message):
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", text)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        simt.describe_plan(4, 20, 10, 16, 8, 3, 4, 132)
    u, W, bias, prior, grad_v = make_inputs(4, 20, 10, 16, 8, torch.float32)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        simt.routing_forward(u, W, bias, None, 3, False, False, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_in_slices_of_the_batch(simt, dtype):
    """A coefficient workspace above its bound makes the backward run slice by slice,
    adding each slice's dW, dbias and dprior (in float32 for half storage): the same
    gradients as in one pass, to rounding."""
    batch, num_in = 70, 12
    u, W, bias, prior, grad_v = make_inputs(batch, num_in, 10, 16, 8, dtype, weight_scale=0.3, prior=True)
    per_sample = 5 * num_in * 10 * 4  # coefficient slots (2 r - 2 + prior) x I x J x 4 bytes
    bound = 40 * per_sample  # slices of 32 samples: 32, 32, 6
    v, s_saved, _ = simt.routing_forward(u, W, bias, prior, 3, True, False, False)
    whole = simt.routing_backward(grad_v, u, W, prior, s_saved, True, False)[:4]
    simt.clear_launch_log()
    sliced = simt.routing_backward(grad_v, u, W, prior, s_saved, True, False, max_coefficient_bytes=bound)[:4]
    assert simt.launch_log().count("gradient_kernel") == 3, simt.launch_log()
    for name, a, e in zip(("grad_u", "grad_W", "grad_bias", "grad_prior"), sliced, whole):
        assert a.dtype == dtype and a.shape == e.shape, name
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3 * e.abs().max().item())
        torch.testing.assert_close(a, e, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    if dtype == torch.float32:
        expected = reference_outputs(u, W, bias, prior, grad_v, 3, leaky=True)[2:]
        for name, a, e in zip(("grad_u", "grad_W", "grad_bias", "grad_prior"), sliced, expected):
            scale = max(e.abs().max().item(), 1.0)
            torch.testing.assert_close(a.double(), e, rtol=2e-4, atol=2e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(4, 40, 10, 16, 8), (3, 9, 4, 5, 3)], ids=["capsnet_tile", "generic_tile"])
def test_half_precision_accuracy(simt, half, shape):
    """float16/bfloat16 in, float32 math: the error against a float64 reference is at most
    twice the error of the reference computed in the same low precision (the way
    flash-attention tests its half-precision kernels)."""
    u, W, bias, prior, grad_v = make_inputs(*shape, half, weight_scale=0.3, prior=True)
    actual = run_emulated(simt, u, W, bias, prior, grad_v, 3, leaky=True)
    exact = reference_outputs(u, W, bias, prior, grad_v, 3, leaky=True)
    low = reference_outputs(u, W, bias, prior, grad_v, 3, leaky=True, dtype=half)
    for name, a, e, lo in zip(OUTPUT_NAMES, actual, exact, low):
        assert a.dtype == half, f"{name}: {a.dtype}"
        ours = (a.double() - e).abs().max().item()
        theirs = (lo.double() - e).abs().max().item()
        assert ours <= 2 * theirs, f"{name} ({half}): error {ours:.3e} > 2 x {theirs:.3e} (reference in {half})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", [(False, False), (True, True), (False, True)], ids=["default", "prior-leaky", "leaky"])
@pytest.mark.parametrize("detach", [False, True], ids=["full", "detach"])
def test_backward_recomputes_the_forward_couplings_bitwise(simt, flags, detach, dtype):
    """The forward saves only s_saved; the backward recomputes the last iteration's couplings
    with the same device functions, and must get the very bits the forward returned."""
    prior, leaky = flags
    r = 3
    u, W, bias, logit_prior, grad_v = make_inputs(37, 50, 10, 16, 8, dtype, weight_scale=0.3, prior=prior)
    v, s_saved, couplings = simt.routing_forward(u, W, bias, logit_prior, r, leaky, detach, True, multiprocessor_count=3)
    *_, coefficients = simt.routing_backward(grad_v, u, W, logit_prior, s_saved, leaky, detach, multiprocessor_count=3)
    plan = simt.describe_plan(37, 50, 10, 16, 8, r, 8 if dtype == torch.float64 else 4, 3, prior, detach)
    slot = 0 if detach else r - 2  # BackwardTerms::coupling_slot(r - 1), csrc/cuda/routing_layout.h
    recomputed = coefficients.view(-1, 50, 10, plan["coefficient_batch"])[slot, :, :, :37].permute(2, 0, 1)
    assert torch.equal(recomputed, couplings)


# ---------------------------------------------------------------------------------------
# Every kernel, launch bounds, launch order.
# ---------------------------------------------------------------------------------------
def declared_kernels():
    pattern = r"__global__\s+void\s+(?:__launch_bounds__\(([^,)]*)[^)]*\)\s+)?(\w+)"
    return {name: bound for source in KERNEL_SOURCES for bound, name in re.findall(pattern, source.read_text())}


def top_level_split(text):
    """`text` split at the commas outside angle brackets and parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "<(") - (char in ">)")
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()] if current.strip() else parts


def kernel_template_parameters():
    """Each kernel's template parameters in order: (name, default or None)."""
    pattern = r"template\s*<([^;{]*?)>\s*__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)"
    parameters = {}
    for source in KERNEL_SOURCES:
        for header, name in re.findall(pattern, source.read_text()):
            declared = [re.match(r"(?:typename|\w+)\s+(\w+)(?:\s*=\s*(.+))?$", part) for part in top_level_split(header)]
            parameters[name] = [(m.group(1), m.group(2)) for m in declared]
    return parameters


def test_every_kernel_is_emulated(simt):
    declared = set(declared_kernels())
    assert len(declared) >= 7, f"could not parse the kernels of {KERNEL_SOURCES}: {declared}"
    simt.clear_launch_log()
    for shape in [(3, 40, 10, 16, 8), (3, 40, 4, 5, 3)]:  # CapsNet tile, generic tile
        for prior, leaky, detach, r in [(True, False, False, 3), (False, True, False, 3), (True, True, True, 3), (False, False, False, 1)]:
            u, W, bias, logit_prior, grad_v = make_inputs(*shape, dtype=torch.float32, prior=prior)
            run_emulated(simt, u, W, bias, logit_prior, grad_v, r, leaky=leaky, detach=detach)
    launched = set(simt.launch_log()) - {"cudaMemsetAsync"}
    assert launched == declared, f"never launched: {declared - launched}; unknown: {launched - declared}"
    full = simt.full_launch_log()
    steps = {name.split("ForwardStep::")[1].split(",")[0].rstrip(">") for name in full if "ForwardStep::" in name}
    assert steps == {"kUniformFirst", "kPriorFirst", "kLater", "kLaterLeaky"}, steps
    passes = {name.split("SweepPass::")[1].split(",")[0] for name in full if "SweepPass::" in name}
    assert passes == {"kFirstLogitGrads", "kLogitGrads", "kPriorGrads", "kCouplingsOnly"}, passes


def test_launchers_use_each_kernels_launch_bound():
    """The bound the launchers check a block against (CAPSNET_KERNEL's first argument) is the
    expression the kernel's __launch_bounds__ names."""
    declared = declared_kernels()
    parameters = kernel_template_parameters()
    host = re.sub(r"//.*", "", (CUDA_DIR / "routing_launches.h").read_text())
    uses = re.findall(r"CAPSNET_KERNEL\(\s*([^,]+?),\s*(\w+)<([^()]*)>\)", host)
    assert {name for _, name, _ in uses} == set(declared), uses
    for bound, name, arguments in uses:
        # The declared bound with the kernel's parameters as this launch gives them (its
        # template arguments, or the parameters' defaults).
        given = top_level_split(arguments)
        expected = declared[name]
        for k, (parameter, default) in enumerate(parameters[name]):
            value = given[k] if k < len(given) else default
            expected = re.sub(rf"\b{parameter}\b", value, expected)
        assert bound.strip() == expected.strip(), f"{name}: launched with bound {bound}, declared {declared[name]}"


def test_launch_order(simt):
    """One launch per forward iteration and per sweep pass (the chunk trees squash inside
    them), then the gradient kernel. The trees' counters are zeroed once, by the first call
    that needs them: every tree leaves them at zero, and the launcher keeps them."""
    u, W, bias, _, grad_v = make_inputs(2, 20, 3, 16, 8, dtype=torch.float32)
    assert simt.describe_plan(2, 20, 3, 16, 8, 3)["chunk_levels"] > 0
    forward = ["forward_iteration_kernel"] * 3
    backward = ["backward_sweep_kernel"] * 2 + ["gradient_kernel"]
    simt.forget_tree_counters()
    simt.clear_launch_log()
    run_emulated(simt, u, W, bias, None, grad_v, 3)
    assert simt.launch_log() == ["cudaMemsetAsync"] + forward + backward
    simt.clear_launch_log()
    run_emulated(simt, u, W, bias, None, grad_v, 3)
    assert simt.launch_log() == forward + backward
    simt.clear_launch_log()
    run_emulated(simt, u, W, bias, None, grad_v, 3, detach=True)
    assert simt.launch_log() == forward + ["backward_sweep_kernel", "gradient_kernel"]
    simt.clear_launch_log()
    run_emulated(simt, u, W, bias, None, grad_v, 1)
    assert simt.launch_log() == ["forward_iteration_kernel", "backward_output_kernel", "gradient_kernel"]


def test_kept_tree_counters(simt):
    """Calls that reuse the kept counters give bitwise the results of a call that zeroed
    new ones; a call needing more counters than are kept zeroes a larger buffer first."""
    simt.forget_tree_counters()
    small = make_inputs(2, 20, 3, 16, 8, dtype=torch.float32, seed=1)
    large = make_inputs(70, 40, 3, 16, 8, dtype=torch.float32, seed=2)  # 3 sample tiles
    fresh = run_emulated(simt, *small, 3)
    kept = run_emulated(simt, *small, 3)
    for name, a, b in zip(OUTPUT_NAMES, fresh, kept):
        assert torch.equal(a, b), f"{name} differs when the kept counters are reused"
    plan = simt.describe_plan(2, 20, 3, 16, 8, 3)
    assert simt.last_counters().numel() == plan["sample_tiles"] * plan["num_chunks"]
    simt.clear_launch_log()
    outputs = run_emulated(simt, *large, 3)
    assert simt.launch_log()[0] == "cudaMemsetAsync", "a larger call must zero a larger buffer"
    assert simt.launch_log().count("cudaMemsetAsync") == 1
    assert_matches(outputs, reference_outputs(*large, 3), torch.float32)
    simt.clear_launch_log()
    again = run_emulated(simt, *small, 3)
    assert "cudaMemsetAsync" not in simt.launch_log(), "a smaller call uses the larger kept buffer"
    for name, a, b in zip(OUTPUT_NAMES, fresh, again):
        assert torch.equal(a, b), f"{name} differs with a larger kept buffer"


def test_tests_cover_both_tile_classes(simt):
    tiles = {simt.describe_plan(b, i, j, d, e, r, 4, sm)["tile"] for b, i, j, d, e, r, _, sm in SMALL_SHAPES}
    assert tiles == {"CapsNetTile", "GenericTile"}


# ---------------------------------------------------------------------------------------
# Determinism, data races, layouts, edge cases.
# ---------------------------------------------------------------------------------------
SCHEDULES = [("ascending", 0), ("descending", 0), ("shuffled", 1), ("shuffled", 2)]


@pytest.mark.parametrize(
    "shape, flags, sm_count, dtype",
    [((3, 1152, 10, 16, 8), (False, False, False), 2, torch.float32),
     ((3, 40, 4, 5, 3), (True, True, False), 2, torch.float32),
     ((37, 20, 3, 16, 8), (True, False, False), 2, torch.float32),
     ((37, 20, 3, 16, 8), (False, True, True), 2, torch.float32),
     ((70, 90, 10, 16, 8), (False, False, False), 40, torch.float32),
     ((37, 20, 10, 16, 8), (True, False, False), 2, torch.float64)],
    ids=["capsnet", "generic-prior-leaky", "two-tiles-prior", "two-tiles-leaky-detach", "deep-chunk-trees",
         "capsnet-float64"],
)
def test_bitwise_identical_under_every_schedule(simt, shape, flags, sm_count, dtype):
    """Threads and blocks in other orders give the same bits: no thread reads shared or
    global memory before the barrier that orders it after its write (a missing barrier makes
    some order read a stale or NaN value), every sum has a fixed order, and the chunk trees
    add the same pairs whichever block arrives last."""
    prior, leaky, detach = flags
    if sm_count == 40:
        plan = simt.describe_plan(*shape, 3, 4, sm_count)
        assert plan["chunk_levels"] >= 3 and plan["num_chunks"] & (plan["num_chunks"] - 1) and plan["sample_tiles"] == 3, plan
    if dtype == torch.float64:  # four row groups of 4 rows per W[i, j], several sample groups
        gradients = simt.describe_plan(*shape, 3, 8, sm_count)["launches"]["gradient_kernel"]
        assert gradients["block"][0] * gradients["block"][2] == 4 * 8 and gradients["block"][2] >= 2, gradients
    u, W, bias, logit_prior, grad_v = make_inputs(*shape, dtype=dtype, weight_scale=0.05, prior=prior)
    runs = [
        run_emulated(simt, u, W, bias, logit_prior, grad_v, 3, leaky=leaky, detach=detach, schedule=s, seed=seed,
                     multiprocessor_count=sm_count)
        for s, seed in SCHEDULES
    ]
    for (schedule, seed), run in zip(SCHEDULES[1:], runs[1:]):
        for name, first, other in zip(OUTPUT_NAMES, runs[0], run):
            assert torch.equal(first, other), f"{name} differs between ascending and {schedule} (seed {seed})"
    assert not any(torch.isnan(t).any() for t in runs[0])


def test_non_contiguous_and_misaligned_inputs(simt):
    u, W, bias, prior, grad_v = make_inputs(2, 24, 3, 16, 8, dtype=torch.float32, prior=True)
    expected = run_emulated(simt, u, W, bias, prior, grad_v, 3)
    # A transposed u, and a W that starts one float into its storage (not 16-byte aligned,
    # which the CapsNet tile's vector loads need: the host copies it).
    u_strided = u.transpose(0, 1).contiguous().transpose(0, 1)
    W_misaligned = torch.empty(W.numel() + 1, dtype=W.dtype)[1:].view_as(W).copy_(W)
    assert W_misaligned.is_contiguous() and W_misaligned.data_ptr() % 16 != 0
    bias_strided = bias.t().contiguous().t()
    prior_strided = prior.t().contiguous().t()
    grad_v_strided = grad_v.transpose(1, 2).contiguous().transpose(1, 2)
    actual = run_emulated(simt, u_strided, W_misaligned, bias_strided, prior_strided, grad_v_strided, 3)
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert torch.equal(a, e), name


def test_empty_batch(simt):
    u, W, bias, prior, _ = make_inputs(0, 6, 3, 4, 8, dtype=torch.float32, prior=True)
    v, s_saved, couplings = simt.routing_forward(u, W, bias, prior, 3, False, False, True)
    assert v.shape == (0, 3, 4) and s_saved.shape == (0, 3, 3, 4) and couplings.shape == (0, 6, 3)
    grad_u, grad_W, grad_bias, grad_prior, _ = simt.routing_backward(torch.zeros(0, 3, 4), u, W, prior, s_saved)
    assert grad_u.shape == u.shape
    assert torch.equal(grad_W, torch.zeros_like(W)) and torch.equal(grad_bias, torch.zeros_like(bias))
    assert torch.equal(grad_prior, torch.zeros_like(prior))


def test_couplings_output_is_empty_unless_asked(simt):
    u, W, bias, _, _ = make_inputs(2, 6, 3, 4, 8, dtype=torch.float32)
    _, _, couplings = simt.routing_forward(u, W, bias, None, 3, False, False, False)
    assert couplings.shape == (0,)


def test_zero_input_gives_zero_output_and_finite_gradients(simt):
    """s = 0 is squash's singular point: v = 0 and a finite (zero-limit) gradient, like the reference."""
    _, W, _, _, grad_v = make_inputs(2, 10, 3, 16, 8, dtype=torch.float64)
    u = torch.zeros(2, 10, 8, dtype=torch.float64)
    actual = run_emulated(simt, u, W, None, None, grad_v, 3)
    assert torch.equal(actual[0], torch.zeros_like(actual[0]))
    assert all(torch.isfinite(t).all() for t in actual)
    assert_matches(actual, reference_outputs(u, W, None, None, grad_v, 3), torch.float64)


def test_large_agreements_do_not_overflow_the_coupling_step(simt):
    """Logits of several hundred (exp overflows float32 above ~88): max-subtracted."""
    u, W, bias, _, grad_v = make_inputs(2, 30, 4, 16, 8, dtype=torch.float32, weight_scale=3.0)
    for leaky in (False, True):
        actual = run_emulated(simt, u, W, bias, None, grad_v, 3, leaky=leaky)
        assert all(torch.isfinite(t).all() for t in actual)
        assert_matches(actual, reference_outputs(u, W, bias, None, grad_v, 3, leaky=leaky), torch.float32)


def test_huge_inputs_squash_to_unit_vectors(simt):
    """|s| far beyond where |s|^2 overflows float32 (the seam's squash is exact there)."""
    u, W, bias, _, grad_v = make_inputs(2, 12, 3, 16, 8, dtype=torch.float32)
    u = u * 1e25
    actual = run_emulated(simt, u, W, None, None, grad_v, 2)
    assert all(torch.isfinite(t).all() for t in actual)
    lengths = actual[0].norm(dim=-1)
    torch.testing.assert_close(lengths, torch.ones_like(lengths), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", [(False, False, False), (True, True, False), (True, False, True)], ids=option_id)
def test_matches_cpu_kernel(simt, dtype, flags):
    import capsnet

    assert capsnet.has_kernel("cpu", dtype), "capsnet._C has no CPU kernel: build the extension"
    prior, leaky, detach = flags
    u, W, bias, logit_prior, grad_v = make_inputs(3, 100, 10, 16, 8, dtype=dtype, weight_scale=0.1, prior=prior)
    v, s_saved, couplings = torch.ops.capsnet.routing_forward(u, W, bias, logit_prior, 3, leaky, detach, True)
    grads = torch.ops.capsnet.routing_backward(grad_v, u, W, logit_prior, s_saved, leaky, detach)
    expected = [t.double() for t in (v, couplings, *grads)]
    assert_matches(run_emulated(simt, u, W, bias, logit_prior, grad_v, 3, leaky=leaky, detach=detach), expected, dtype)


# ---------------------------------------------------------------------------------------
# Argument checks and limits (the host code the CUDA launcher runs).
# ---------------------------------------------------------------------------------------
def test_unsupported_shapes_are_rejected_with_the_limit(simt):
    for shape, message in [
        ((1, 2, 3, 33, 4), r"D_out <= 32, got D_out = 33"),
        ((1, 2, 3, 4, 33), r"D_in <= 32, got D_in = 33"),
        ((1, 2, 1025, 1, 1), r"N_out <= 1024"),
    ]:
        u, W, _, _, _ = make_inputs(*shape, dtype=torch.float32)
        with pytest.raises(RuntimeError, match=message):
            simt.routing_forward(u, W, None, None, 2)


def test_argument_errors_name_the_argument(simt):
    """The checks are those of every backend (csrc/routing_checks.h)."""
    u, W, bias, prior, grad_v = make_inputs(2, 5, 3, 4, 8, dtype=torch.float32, prior=True)
    cases = [
        ((u, W.double(), bias, None, 3), r"W must have the dtype of u"),
        ((u, W[:4], bias, None, 3), r"W must have shape \[N_in=5"),
        ((u, W, bias[:2], None, 3), r"bias must have shape \[N_out, D_out\] = \[3, 4\]"),
        ((u, W, bias, prior[:, :2], 3), r"logit_prior must have shape \[N_in, N_out\] = \[5, 3\]"),
        ((u.int(), W, bias, None, 3), r"u must be float16, bfloat16, float32 or float64"),
        ((u, W, bias, None, 0), r"num_iterations must be between 1 and"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            simt.routing_forward(*args)
    _, s_saved, _ = simt.routing_forward(u, W, bias, prior, 3)
    with pytest.raises(RuntimeError, match=r"grad_v must have shape \[B, N_out, D_out\] = \[2, 3, 4\]"):
        simt.routing_backward(grad_v[:, :2], u, W, prior, s_saved)
    with pytest.raises(RuntimeError, match=r"s_saved must have shape"):
        simt.routing_backward(grad_v, u, W, prior, s_saved[:, :, :2])
    with pytest.raises(RuntimeError, match=r"s_saved must have dtype"):
        simt.routing_backward(grad_v, u, W, prior, s_saved.double())


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


def test_emulator_catches_small_shared_memory_overflow(simt):
    """A write into the bytes that round the shared memory up to 16 (the canary)."""
    with pytest.raises(RuntimeError, match="wrote past the end of its 60 bytes of dynamic shared memory"):
        simt.selftest_shared_overflow(15)
    assert torch.isnan(simt.selftest_read_unwritten_shared()).all()


def _run_selftest_in_subprocess(call: str) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks import emulator; emulator.load().{call}"
    env = os.environ.copy()
    # Under make test-cuda-asan the expected fault must not count as a sanitizer report.
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":handle_segv=0"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def test_emulator_faults_on_shared_memory_read_past_the_end():
    """The guard page after the dynamic shared memory: a read 16 bytes or more past its end
    ends the process with SIGSEGV (as the GPU faults); an access inside it does not."""
    fine = _run_selftest_in_subprocess("selftest_read_shared_at(16, 15)")
    assert fine.returncode == 0, fine.stderr[-2000:]
    faulted = _run_selftest_in_subprocess("selftest_read_shared_at(16, 16)")
    assert faulted.returncode != 0, "a read past the shared memory did not fault"


def test_emulator_rejects_misaligned_vector_loads(simt):
    assert simt.selftest_vector_load(0) == 0.0
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        simt.selftest_vector_load(1)


def test_emulator_checks_launch_bounds(simt):
    simt.selftest_launch_bounds(64)
    with pytest.raises(RuntimeError, match="exceeds the kernel's __launch_bounds__ of 64"):
        simt.selftest_launch_bounds(96)
