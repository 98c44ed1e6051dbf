"""Bitwise determinism of the fused op: repeated runs and different thread counts."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from routing_testing import RoutingCase, make_inputs, run_routing

CASES = [
    RoutingCase(batch=5, num_in=100, num_out=10, dim_out=16, dim_in=8, iterations=3),
    RoutingCase(batch=7, num_in=37, num_out=3, dim_out=5, dim_in=3, iterations=4),
]


def _assert_bitwise_equal(first, second, what):
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between {what}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_repeated_runs_are_bitwise_identical(case, device):
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device=device)
    first = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    for _ in range(3):
        _assert_bitwise_equal(first, run_routing(u, W, bias, grad_v, case.iterations, backend="fused"), "runs")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_thread_count_does_not_change_results(case):
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        many = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
        torch.set_num_threads(1)
        one = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(many, one, f"{max(2, threads)} threads and 1 thread")
