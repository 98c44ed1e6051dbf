"""Routing benchmarks for pytest-benchmark: fused vs reference vs torch.compile(reference).

    pytest benchmarks/ --benchmark-only                        # run and print, grouped
    pytest benchmarks/ --benchmark-only --benchmark-save=NAME  # also save to .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare    # against the last saved run
    pytest benchmarks/ --benchmark-only -k "cpu and B128"      # a subset

Groups: device, batch size and direction ("forward" under no_grad, "forward+backward" into u,
W and bias), so each table row compares the three variants on one case. CapsNet shape
(N_in=1152, N_out=10, D_out=16, D_in=8), r=3, float32, with bias. On a GPU every timed call
ends with torch.cuda.synchronize(), so a round measures finished work. The first calls
(torch.compile's compilation, allocator warm-up) run before timing.

Not part of `make test`: pytest.ini's testpaths is tests/ only. benchmarks/conftest.py records
the machine context with every saved run, and the fused forward's FLOP-floor ratio.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import FLOOR_KEY
from benchmarks.routing_cases import CAPSNET, DIRECTIONS, VARIANTS, forward_flops, make_inputs, make_step, routing_function

ITERATIONS = 3
DTYPE = torch.float32
BATCH_SIZES = (1, 32, 128)
WARMUP_CALLS = 2
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: d.replace("+", "_"))
@pytest.mark.parametrize("batch", BATCH_SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("device", DEVICES)
def test_routing(benchmark, mm_gflops, device, batch, direction, variant):
    u, W, bias, grad_v = make_inputs(CAPSNET, batch, device, DTYPE)
    u, W, bias = (t.requires_grad_() for t in (u, W, bias))
    step = make_step(direction, routing_function(variant, ITERATIONS), u, W, bias, grad_v)
    rate = mm_gflops(device)  # measured before this session's first timing on the device
    for _ in range(WARMUP_CALLS):
        step()

    benchmark.group = f"{device} B={batch} {direction}"
    benchmark.extra_info.update(
        shape=CAPSNET.describe(), batch=batch, iterations=ITERATIONS, dtype=str(DTYPE).removeprefix("torch."),
        threads=torch.get_num_threads(),
    )
    benchmark(step)

    if direction == "forward" and variant == "fused" and benchmark.stats is not None:  # None: --benchmark-disable
        flops = forward_flops(CAPSNET, batch, ITERATIONS)
        floor_s = flops / (rate * 1e9)
        benchmark.extra_info.update(forward_gflop=flops / 1e9, floor_ms=floor_s * 1e3)
        benchmark.extra_info[FLOOR_KEY] = benchmark.stats.stats.median / floor_s
