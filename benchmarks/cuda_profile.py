"""Per-kernel GPU times of the fused routing (torch.profiler) beside the static model's estimates.

    python -m benchmarks.cuda_profile --batch-sizes 32 128 512 1024 --out benchmarks/results/gpu-check
    python -m benchmarks.cuda_profile --dry-run      # no GPU: the model's side only, to check the script
    CAPSNET_CUDA_PLAN=staging_slots=0 python -m benchmarks.cuda_profile --suffix=-direct   # another plan

For each batch size: a CapsNet-shape float32 forward+backward (r = 3), warmed up, then
``--steps`` steps under torch.profiler; each CUDA kernel's device time per step, grouped as
benchmarks/cuda_model.py groups them (``forward_iteration_kernel<kLater>``, ...), beside the
model's estimate for the architecture of the device (sm_90 without a GPU) and the ratio.
Writes ``cuda-kernels<suffix>.md`` and ``.json`` into ``--out``. Both sides follow
CAPSNET_CUDA_PLAN (docs/CUDA.md, "Launch plan"), which the header line names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from benchmarks import cuda_model

CAPSNET = cuda_model.CAPSNET_SHAPE


def model_key(kernel_name: str, enums: dict | None = None) -> str | None:
    """A profiler event's name as cuda_model names its rows:
    'void capsnet::cuda::forward_iteration_kernel<float, capsnet::cuda::CapsNetTile, (capsnet::cuda::ForwardStep)2>(...)'
    (or '..., capsnet::cuda::ForwardStep::kLater>') -> 'forward_iteration_kernel<kLater>'; a memset
    -> 'cudaMemsetAsync'; None for other kernels. A forward or sweep kernel whose last template
    argument (its InputRing's slots) is not 0 reads W and u through the ring: '<kLater, staged>'. A float
    gradient kernel with 4 rows of W[i, j] per thread (the default): 'gradient_kernel<narrow>',
    or 'gradient_kernel<narrow, at use>' without its loads ahead (CAPSNET_CUDA_PLAN=
    gradient_loads_ahead=0); with 8 (CAPSNET_CUDA_PLAN=gradient_rows=8): 'gradient_kernel<wide>'."""
    if kernel_name.startswith("Memset"):
        return cuda_model.MEMSET
    m = re.search(r"capsnet::cuda::(\w+_kernel)<(.*)>\s*\(", kernel_name)
    if not m:
        return None
    name, arguments = m.groups()
    if name == "gradient_kernel" and re.match(r"float,.*,\s*4\s*(,\s*(true|1)\s*)?$", arguments):
        return f"{name}<narrow>"
    if name == "gradient_kernel" and re.match(r"float,.*,\s*4\s*,\s*(false|0)\s*$", arguments):
        return f"{name}<narrow, at use>"
    if name == "gradient_kernel" and re.match(r"float,.*,\s*8\s*(,\s*(true|false|1|0)\s*)?$", arguments):
        return f"{name}<wide>"
    ringed = ("forward_iteration_kernel", "backward_sweep_kernel")
    slots = re.search(r",\s*(\d+)\s*$", arguments) if name in ringed else None
    staged = ", staged" if slots and int(slots.group(1)) > 0 else ""
    named = re.search(r"::(k\w+)\b", arguments)
    if named:
        return f"{name}<{named.group(1)}{staged}>"
    numbered = re.search(r"\(capsnet::cuda::(\w+)\)(\d+)", arguments)
    if numbered:
        enums = cuda_model.enum_values() if enums is None else enums
        return f"{name}<{enums[numbered.group(1)][int(numbered.group(2))]}{staged}>"
    return name


def measure(batch: int, steps: int) -> dict[str, float]:
    """Microseconds per forward+backward step, per kernel (model keys)."""
    from torch.profiler import ProfilerActivity, profile

    from capsnet import dynamic_routing

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, CAPSNET["num_in"], CAPSNET["dim_in"], generator=gen).cuda().requires_grad_()
    W = (0.05 * torch.randn(CAPSNET["num_in"], CAPSNET["num_out"], CAPSNET["dim_out"], CAPSNET["dim_in"], generator=gen)).cuda().requires_grad_()
    grad_v = torch.randn(batch, CAPSNET["num_out"], CAPSNET["dim_out"], generator=gen).cuda()

    def step():
        v = dynamic_routing(u, W, None, 3, backend="fused")
        torch.autograd.grad(v, (u, W), grad_v)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        key = model_key(event.key)
        if key is not None:
            device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
            times[key] = times.get(key, 0.0) + device_us / steps
    return times


def device_arch() -> str:
    if not torch.cuda.is_available():
        return "sm_90"
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    return arch if arch in cuda_model.GPUS else "sm_90"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--dry-run", action="store_true", help="no GPU: the model's estimates only")
    parser.add_argument("--suffix", default="", help="added to the output files' names (cuda-kernels<suffix>.md)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("cuda_profile: no CUDA GPU is visible (use --dry-run to check the script without one)")
    arch = device_arch()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
    plan = os.environ.get("CAPSNET_CUDA_PLAN", "")
    lines = [
        f"Per-kernel times of one CapsNet-shape float32 forward+backward (r = 3) on {device}, "
        f"beside benchmarks/cuda_model.py's estimates for {arch}"
        + (f", under CAPSNET_CUDA_PLAN={plan}." if plan else ", under the planner's own plan."),
        "",
        "| B | kernel | measured us | model us | measured / model |",
        "|---|---|---|---|---|",
    ]
    records = []
    for batch in args.batch_sizes:
        model_args = argparse.Namespace(arch=arch, batch=batch, dtype="float32", iterations=3, detach_routing=False)
        forward, backward, _, _ = cuda_model.estimate(model_args)
        estimates: dict[str, float] = {}
        for row in forward + backward:  # the memsets of the forward and of the backward share a row
            estimates[row.kernel] = estimates.get(row.kernel, 0.0) + row.microseconds
        measured = {} if args.dry_run else measure(batch, args.steps)
        for kernel in list(estimates) + [k for k in measured if k not in estimates]:
            m, e = measured.get(kernel), estimates.get(kernel)
            ratio = f"{m / e:.2f}" if m is not None and e else "n/a"
            lines.append(
                f"| {batch} | {kernel} | {'n/a' if m is None else f'{m:.1f}'} | {'n/a' if e is None else f'{e:.1f}'} | {ratio} |"
            )
            records.append(dict(batch=batch, kernel=kernel, measured_us=m, model_us=e))
        total_m = sum(measured.values()) if measured else None
        total_e = sum(estimates.values())
        lines.append(
            f"| {batch} | **total** | {'n/a' if total_m is None else f'{total_m:.1f}'} | {total_e:.1f} | "
            f"{f'{total_m / total_e:.2f}' if total_m else 'n/a'} |"
        )
        print(f"B={batch}: model {total_e:.1f} us" + ("" if total_m is None else f", measured {total_m:.1f} us"), flush=True)
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"cuda-kernels{args.suffix}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, f"cuda-kernels{args.suffix}.json"), "w") as f:
        json.dump(dict(device=device, arch=arch, dry_run=args.dry_run, plan=plan, rows=records), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
