"""What the fused routing's CUDA kernels wait on: Nsight Compute's warp-state statistics.

    python -m benchmarks.stall_profile --out benchmarks/results/gpu-check-<gpu>   # make gpu-check's `stalls` step

The static model (benchmarks/cuda_model.py) counts instructions. On the H200 the kernels took
2 to 12 times its estimates, and it ranked plans the wrong way round (docs/CUDA.md, "Measured
on an H200"): they wait, and the model cannot see on what. Where the machine has ncu and
lets it read the performance counters, this runs one CapsNet-shape float32 forward+backward
(r = 3, after one warm-up step) under ncu at each batch size, and writes per kernel its
duration, the warp cycles per issued instruction, the achieved occupancy and the largest
stall reasons: how many cycles per issued instruction a warp spent in each state
(``stalls.md``; ncu's raw CSV per batch size beside it, ``stalls-B<N>.csv``).

Without ncu, or when ncu cannot read the counters (ERR_NVGPUCTRPERM in containers that do
not allow it), ``stalls.md`` says so and the exit status is 0: a diagnostic the machine
cannot give is not a failure of the kernels.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys

CAPSNET = dict(num_in=1152, num_out=10, dim_out=16, dim_in=8)
ITERATIONS = 3
# The kernels of one step at r = 3 without a prior: forward_iteration x 3, backward_sweep x 2
# (m = 2, 1), gradient_kernel. ncu skips the warm-up step's and profiles the next step's.
KERNELS = r"regex:forward_iteration_kernel|backward_sweep_kernel|gradient_kernel"
KERNELS_PER_STEP = 6
SECTIONS = ("WarpStateStats", "Occupancy", "SpeedOfLight")

STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")
DURATION = "gpu__time_duration.sum"
CYCLES_PER_ISSUE = re.compile(r"^smsp__average_warp_latency_per_inst_issued\.ratio$")
OCCUPANCY = "sm__warps_active.avg.pct_of_peak_sustained_active"


def find_ncu() -> str | None:
    candidates = [shutil.which("ncu")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "ncu"))
    candidates += sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def workload(batch: int) -> None:
    """Two forward+backward steps of the fused op: a warm-up, then the profiled one."""
    import torch

    from capsnet import dynamic_routing

    generator = torch.Generator().manual_seed(0)
    u = torch.randn(batch, CAPSNET["num_in"], CAPSNET["dim_in"], generator=generator).cuda().requires_grad_()
    W = 0.05 * torch.randn(CAPSNET["num_in"], CAPSNET["num_out"], CAPSNET["dim_out"], CAPSNET["dim_in"], generator=generator)
    W = W.cuda().requires_grad_()
    grad_v = torch.randn(batch, CAPSNET["num_out"], CAPSNET["dim_out"], generator=generator).cuda()
    for _ in range(2):
        v = dynamic_routing(u, W, None, ITERATIONS, backend="fused")
        torch.autograd.grad(v, (u, W), grad_v)
    torch.cuda.synchronize()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_raw_csv(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """ncu --page raw --csv: a row of metric names, a row of their units, then one row per
    profiled kernel; returns (kernels, units). Lines before the header (ncu's ==PROF==
    messages) are skipped."""
    lines = text.splitlines()
    start = next((k for k, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return [], {}
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    if len(rows) < 2:
        return [], {}
    header, units, data = rows[0], dict(zip(rows[0], rows[1])), rows[2:]
    return [dict(zip(header, row)) for row in data if len(row) == len(header)], units


MICROSECONDS_PER = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def kernel_label(name: str) -> str:
    """As benchmarks/cuda_model.py names its rows ('forward_iteration_kernel<kLater, staged>'),
    else ncu's name."""
    from benchmarks.cuda_profile import model_key

    # ncu may leave out the return type and the namespace that torch.profiler's names have.
    return model_key(name) or model_key("capsnet::cuda::" + name.removeprefix("void ")) or name


def summarize(kernel: dict[str, str], units: dict[str, str], top: int = 5) -> dict:
    """A kernel's duration (us), cycles per issued instruction, achieved occupancy (%) and
    its `top` largest stall reasons, as (reason, cycles per issued instruction)."""
    stalls = []
    cycles_per_issue = None
    for name, value in kernel.items():
        m = STALL.match(name)
        number = _number(value)
        if m and number is not None:
            stalls.append((m.group(1), number))
        elif CYCLES_PER_ISSUE.match(name):
            cycles_per_issue = number
    stalls.sort(key=lambda item: -item[1])
    duration = _number(kernel.get(DURATION, ""))
    unit_us = MICROSECONDS_PER.get(units.get(DURATION, ""))
    return {
        "kernel": kernel_label(kernel.get("Kernel Name", "?")),
        "duration_us": None if duration is None or unit_us is None else duration * unit_us,
        "cycles_per_issue": cycles_per_issue,
        "occupancy_pct": _number(kernel.get(OCCUPANCY, "")),
        "stalls": stalls[:top],
    }


def _shown(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def format_summary(batch: int, kernels: list[dict]) -> str:
    lines = [f"### B = {batch}", "", "| kernel | us | warp cycles per issue | achieved occupancy % | largest stalls (cycles per issue) |", "|---|---|---|---|---|"]
    for k in kernels:
        stalls = ", ".join(f"{reason} {cycles:.1f}" for reason, cycles in k["stalls"]) or "none reported"
        lines.append(f"| {k['kernel']} | {_shown(k['duration_us'])} | {_shown(k['cycles_per_issue'])} | {_shown(k['occupancy_pct'])} | {stalls} |")
    return "\n".join(lines) + "\n"


def profile(ncu: str, batch: int, out: pathlib.Path) -> tuple[str, bool]:
    """(the section of stalls.md for this batch size, whether ncu gave kernel rows)."""
    raw = out / f"stalls-B{batch}.csv"
    command = [ncu, "--kernel-name", KERNELS, "--launch-skip", str(KERNELS_PER_STEP), "--launch-count", str(KERNELS_PER_STEP)]
    for section in SECTIONS:
        command += ["--section", section]
    command += ["--page", "raw", "--csv", "--log-file", str(raw), sys.executable, "-m", "benchmarks.stall_profile", "--workload", "--batch", str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    text = raw.read_text() if raw.exists() else ""
    kernels, units = parse_raw_csv(text)
    if result.returncode != 0 or not kernels:
        message = (result.stdout + result.stderr + text)[-2000:]
        reason = "ncu cannot read the performance counters (ERR_NVGPUCTRPERM)" if "ERR_NVGPUCTRPERM" in message else "ncu gave no kernel rows"
        return f"### B = {batch}\n\n{reason} (exit {result.returncode}):\n\n```\n{message.strip()}\n```\n", False
    return format_summary(batch, [summarize(k, units) for k in kernels]), True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--out", default="benchmarks/results/stalls")
    parser.add_argument("--workload", action="store_true", help="(internal) the steps ncu profiles")
    parser.add_argument("--batch", type=int, default=128, help="(internal) the workload's batch size")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workload:
        workload(args.batch)
        return 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = "Nsight Compute warp-state statistics of one CapsNet-shape float32 forward+backward (r = 3).\n\n"
    ncu = find_ncu()
    if ncu is None:
        text = header + "Not collected: ncu not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, /opt/nvidia/nsight-compute).\n"
        (out / "stalls.md").write_text(text)
        print(text, end="")
        return 0
    sections = [profile(ncu, batch, out) for batch in args.batch_sizes]
    text = header + f"ncu: {ncu}\n\n" + "\n".join(section for section, _ in sections)
    (out / "stalls.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
