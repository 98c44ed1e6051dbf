"""The GPU experiments of make gpu-check, checked without a GPU.

The staging experiment's kernels (benchmarks/staging_kernels, timed on a GPU by
benchmarks/staging_experiment.py) on the CPU emulator: W and u staged in a ring of shared
memory slots must give the direct loop's partial sums bit for bit, under every thread order
(a slot refilled while a thread still reads it would show as a difference), and those sums
must be the chunks' sums of W[i, j] u[b, i]. The plan sweep (benchmarks/plan_sweep.py): the
plans it asks for and its fit of a kernel's time to inputs per chunk and tree levels."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import emulator, plan_sweep
from benchmarks.staging_experiment import KERNELS, STAGES, reference_partials


@pytest.fixture(scope="module")
def loop():
    module = emulator.build_module(
        "capsnet_staging_experiment_emulated",
        [KERNELS / "emulated_input_loop.cpp", emulator.CSRC / "simt" / "simt.cpp"],
        include_paths=(KERNELS,),
    )
    return module.input_loop


def _inputs(batch: int, num_in: int, num_out: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, num_in, 8, generator=generator)
    W = torch.randn(num_in, num_out, 16, 8, generator=generator) * 0.1
    return u, W


# Samples past the batch in the last tile (B = 37: 5 of 64), a last chunk shorter than the
# others (13 = 4 + 4 + 4 + 1), chunks shorter and longer than the ring, J < 10.
@pytest.mark.parametrize("batch, num_in, num_out, chunk", [(37, 13, 10, 4), (16, 9, 3, 9), (32, 7, 10, 1)])
@pytest.mark.parametrize("schedule", ["ascending", "descending", "shuffled"])
def test_staged_loop_equals_direct_loop_bitwise(loop, batch, num_in, num_out, chunk, schedule):
    u, W = _inputs(batch, num_in, num_out)
    direct = loop(u, W, chunk, 0, "ascending", 0)
    reference = reference_partials(u, W, chunk)
    assert direct.shape == reference.shape
    torch.testing.assert_close(direct.double(), reference, rtol=1e-5, atol=1e-5)
    for stages in STAGES[1:]:
        staged = loop(u, W, chunk, stages, schedule, 7)
        assert torch.equal(staged, direct), f"{stages} stages, {schedule}: max diff {(staged - direct).abs().max()}"


def test_bad_arguments_are_refused_with_their_names(loop):
    u, W = _inputs(4, 5, 10)
    with pytest.raises(RuntimeError, match="stages must be 0, 2, 3 or 4, got 1"):
        loop(u, W, 2, 1, "ascending", 0)
    with pytest.raises(RuntimeError, match="inputs_per_chunk must be >= 1, got 0"):
        loop(u, W, 0, 0, "ascending", 0)
    with pytest.raises(RuntimeError, match=r"W must be \[N_in, 1 <= N_out <= 10, 16, 8\]"):
        loop(u, W[:4], 2, 0, "ascending", 0)


def test_plan_sweep_asks_for_the_plans_it_names(monkeypatch):
    monkeypatch.delenv("CAPSNET_CUDA_PLAN", raising=False)
    planned = plan_sweep.describe(128, 132)
    choices = plan_sweep.choices_for(128, 132)
    assert choices[0] == "" and len(choices) == len(set(choices))
    for choice in choices[1:]:
        with plan_sweep.plan_choices(choice):
            plan = plan_sweep.describe(128, 132)
        key, value = choice.split("=")
        assert plan[key] == int(value) and plan[key] != planned[key], (choice, plan, planned)
    assert "CAPSNET_CUDA_PLAN" not in os.environ


@pytest.mark.parametrize("batch, inputs", [(32, 9), (128, 35), (512, 144), (1024, 288)])
def test_plan_sweep_includes_one_block_per_sm(monkeypatch, batch, inputs):
    """Besides multiples of the planner's chunk size, the sweep times the smallest chunks
    that leave every SM at most one routing block (132 SMs; 32 samples per tile)."""
    monkeypatch.delenv("CAPSNET_CUDA_PLAN", raising=False)
    assert f"inputs_per_chunk={inputs}" in plan_sweep.choices_for(batch, 132) or plan_sweep.describe(batch, 132)["inputs_per_chunk"] == inputs
    with plan_sweep.plan_choices(f"inputs_per_chunk={inputs}"):
        plan = plan_sweep.describe(batch, 132)
    assert plan["sample_tiles"] * plan["num_chunks"] <= 132, plan
    with plan_sweep.plan_choices(f"inputs_per_chunk={inputs - 1}"):
        plan = plan_sweep.describe(batch, 132)
    assert plan["sample_tiles"] * plan["num_chunks"] > 132, plan


def test_plan_sweep_fit_separates_inputs_and_levels():
    a, b, c = 4.0, 1.5, 3.0
    rows = [dict(choices=f"inputs_per_chunk={n}", plan=dict(inputs_per_chunk=n, chunk_levels=levels),
                 us={"k": a + b * n + c * levels})
            for n, levels in [(1, 11), (2, 10), (5, 8), (10, 7), (20, 6)]]
    rows.append(dict(choices="sample_groups=8", plan=dict(inputs_per_chunk=5, chunk_levels=8), us={"k": 1000.0}))
    fit = plan_sweep.fit_chunk_costs(rows, "k")
    assert fit == pytest.approx(dict(a=a, b=b, c=c), abs=1e-9)
    assert plan_sweep.fit_chunk_costs(rows[:2], "k") is None
