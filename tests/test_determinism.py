"""Bitwise determinism of the fused op: repeated runs and different thread counts.

Within one CPU kernel variant (the one chosen here; tests/test_cpu_kernel_variants.py runs
every variant this machine supports), the same inputs give bitwise the same results
whatever the number of threads: the work is split by samples and by blocks of input
capsules, and every sum runs in an order fixed by the shape alone.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from routing_testing import RoutingCase, make_inputs, make_prior, run_routing

CASES = [
    RoutingCase(batch=5, num_in=100, num_out=10, dim_out=16, dim_in=8, iterations=3),
    RoutingCase(batch=7, num_in=37, num_out=3, dim_out=5, dim_in=3, iterations=4),
]
OPTIONS = [
    dict(),
    dict(leaky=True, with_prior=True),
    dict(detach_routing=True, with_prior=True),
]


def _options_id(options):
    return "+".join(sorted(options)) or "default"


def _run(case, options, device):
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device=device)
    prior = make_prior(case, dtype=torch.float32, device=device) if options.get("with_prior") else None
    return run_routing(
        u, W, bias, grad_v, case.iterations, "fused", leaky=options.get("leaky", False),
        detach_routing=options.get("detach_routing", False), logit_prior=prior, return_couplings=True,
    )


def _assert_bitwise_equal(first, second, what):
    assert first.keys() == second.keys()
    for name in first:
        if first[name] is None:
            assert second[name] is None
        else:
            assert torch.equal(first[name], second[name]), f"{name} differs between {what}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=_options_id)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_repeated_runs_are_bitwise_identical(case, options, device):
    first = _run(case, options, device)
    for _ in range(3):
        _assert_bitwise_equal(first, _run(case, options, device), "runs")


@pytest.mark.parametrize("options", OPTIONS, ids=_options_id)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_thread_count_does_not_change_results(case, options):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _run(case, options, "cpu")
        torch.set_num_threads(1)
        one = _run(case, options, "cpu")
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(two, one, "2 threads and 1 thread")


def test_large_batch_in_several_backward_chunks_is_thread_independent():
    """A shape whose backward needs several chunks of samples (24 MB of phase-1 planes per
    sample, 256 MB per chunk in csrc/cpu/routing_cpu.cpp): the chunking depends on the shape
    only, so thread counts still agree."""
    case = RoutingCase(batch=12, num_in=3872, num_out=196, dim_out=4, dim_in=2, iterations=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _run(case, dict(with_prior=True), "cpu")
        torch.set_num_threads(1)
        one = _run(case, dict(with_prior=True), "cpu")
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(two, one, "2 threads and 1 thread")
