"""pytest-benchmark set-up: the machine context in every saved run, and the FLOP floor.

``pytest benchmarks/ --benchmark-only`` measures the torch.mm rate once at the start of the
session (benchmarks/machine.py), and:

- adds the machine context (CPU model, vector extensions, capsnet CPU kernel variant, thread
  count, versions) to pytest-benchmark's ``machine_info``, which ``--benchmark-save`` and
  ``--benchmark-json`` write and ``--benchmark-compare`` checks;
- adds the torch.mm rate of this run and the fused forward's FLOP-floor ratios under the key
  ``capsnet_run`` of the saved JSON (kept out of machine_info, which would then differ
  between any two runs and make every comparison warn);
- prints both at the end of the run.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.machine import describe, machine_context, torch_mm_gflops

MM_RATE = pytest.StashKey[dict]()
LOAD_AT_START = pytest.StashKey[list]()
FLOOR_KEY = "fused_forward_floor_ratio"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: runs only where a CUDA GPU is available")
    config.stash[MM_RATE] = {}
    config.stash[LOAD_AT_START] = machine_context("cpu")["load_average_1_5_15_min"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs_cuda: no CUDA GPU visible")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return ["capsnet benchmark machine:", *describe(machine_context("cpu"))]


@pytest.fixture(scope="session")
def mm_gflops(request):
    """torch.mm GFLOP/s per device, measured once per session, before the first benchmark on it."""
    rates = request.config.stash[MM_RATE]

    def rate(device: str) -> float:
        if device not in rates:
            rates[device] = torch_mm_gflops(device)
        return rates[device]

    return rate


def pytest_benchmark_update_machine_info(config, machine_info):
    context = machine_context("cpu")
    # Kept out of machine_info, which must not vary between runs on one machine: the date (the
    # saved JSON has its own "datetime") and the load, which goes to capsnet_run.
    del context["date"]
    context.pop("load_average_1_5_15_min")
    machine_info["capsnet"] = context


def _floor_ratios(benchmarks_json):
    return {
        bench["name"]: bench["extra_info"][FLOOR_KEY]
        for bench in benchmarks_json
        if FLOOR_KEY in bench.get("extra_info", {})
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["capsnet_run"] = {
        "load_average_1_5_15_min": config.stash[LOAD_AT_START],
        "torch_mm_gflops": {device: round(rate, 1) for device, rate in config.stash[MM_RATE].items()},
        FLOOR_KEY: _floor_ratios(output_json["benchmarks"]),
    }


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    rates = config.stash.get(MM_RATE, {})
    if session is None or not session.benchmarks or not rates:
        return
    terminalreporter.section("capsnet: machine context and FLOP floor")
    for line in describe(machine_context("cpu")):
        terminalreporter.write_line(line)
    for device, rate in rates.items():
        terminalreporter.write_line(f"- torch.mm rate ({device}, this run): {rate:.1f} GFLOP/s")
    for bench in session.benchmarks:
        ratio = bench.extra_info.get(FLOOR_KEY)
        if ratio is not None:
            terminalreporter.write_line(
                f"- {bench.name}: median {bench.stats.median * 1e3:.2f} ms = {ratio:.2f}x the FLOP floor "
                f"({bench.extra_info['forward_gflop']:.3f} GFLOP at the torch.mm rate)"
            )
