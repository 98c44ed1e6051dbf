"""Peak memory of one routing step, in a fresh process.

On the CPU the measure is the rise of the resident set: the kernel's high-water mark
(VmHWM, reset through /proc/self/clear_refs) minus the resident size just before the step.
A fresh process per measurement, because memory that one run freed but the allocator kept
would hide part of the next run's peak. On a GPU: torch.cuda.max_memory_allocated.

    python -m benchmarks.memory --variant fused --shape large --batch 128   # prints bytes
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import torch

from benchmarks.routing_cases import CAPSNET, LARGE, VARIANTS, forward_backward_step, make_inputs, routing_function

SHAPES = {shape.name: shape for shape in (CAPSNET, LARGE)}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) * 1024


def resident_peak_rise(step) -> int:
    """Bytes by which the resident set's peak during step() exceeds the resident set before it."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident size
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def forward_backward_peak(variant, shape, batch, device, dtype, iterations, warmup_batch=None) -> int:
    """Peak memory added by one forward+backward, in this process.

    The warm-up (compilation, thread pools, library loading) runs at ``warmup_batch``
    (default: the measured batch); a small one keeps a large measurement's time down."""
    fn = routing_function(variant, iterations)
    warm = make_inputs(shape, warmup_batch or batch, device, dtype)
    u, W, bias = (t.requires_grad_() for t in warm[:3])
    forward_backward_step(fn, u, W, bias, warm[3])()
    del warm, u, W, bias
    u, W, bias, grad_v = make_inputs(shape, batch, device, dtype)
    u, W, bias = (t.requires_grad_() for t in (u, W, bias))
    step = forward_backward_step(fn, u, W, bias, grad_v)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    return resident_peak_rise(step)


def peak_in_fresh_process(variant, shape, batch, dtype, iterations, warmup_batch=None) -> int:
    """forward_backward_peak on the CPU, run in a new Python process."""
    command = [
        sys.executable, "-m", "benchmarks.memory", "--variant", variant, "--shape", shape.name,
        "--batch", str(batch), "--dtype", str(dtype).removeprefix("torch."), "--iterations", str(iterations),
    ]
    if warmup_batch is not None:
        command += ["--warmup-batch", str(warmup_batch)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=CAPSNET.name)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup-batch", type=int, default=None)
    args = parser.parse_args(argv)
    print(forward_backward_peak(args.variant, SHAPES[args.shape], args.batch, "cpu", getattr(torch, args.dtype),
                                args.iterations, args.warmup_batch))


if __name__ == "__main__":
    main()
