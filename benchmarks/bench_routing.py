"""Fused routing vs the eager reference vs torch.compile(reference): time and peak memory.

    python -m benchmarks.bench_routing --device cpu               # B in {32, 128}
    python -m benchmarks.bench_routing --device cuda --batch-sizes 32 128 512

Times come from torch.utils.benchmark (it synchronises CUDA), as the median of blocked
runs; "fwd" is the forward alone under no_grad, "fwd+bwd" a forward and a backward of all
three inputs. Peak memory is measured for forward+backward, in a fresh process per variant
on the CPU (peak resident set growth, /proc/self/status VmHWM after resetting it) and with
torch.cuda.max_memory_allocated on a GPU. The table, with ratios, is printed and written to
benchmarks/results/<device>-<name>.md and .json with the machine and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

import torch
import torch.utils.benchmark as benchmark

from capsnet import dynamic_routing, dynamic_routing_reference

# CapsNet on MNIST (Sabour et al., 2017): 1152 primary capsules of 8-D to 10 digit capsules of 16-D.
CAPSNET_SHAPE = dict(num_in=1152, num_out=10, dim_out=16, dim_in=8)
VARIANTS = ("reference", "compiled", "fused")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_inputs(batch, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = CAPSNET_SHAPE
    u = torch.randn(batch, shape["num_in"], shape["dim_in"], generator=gen, dtype=dtype)
    W = 0.05 * torch.randn(shape["num_in"], shape["num_out"], shape["dim_out"], shape["dim_in"], generator=gen, dtype=dtype)
    bias = 0.1 * torch.randn(shape["num_out"], shape["dim_out"], generator=gen, dtype=dtype)
    grad_v = torch.randn(batch, shape["num_out"], shape["dim_out"], generator=gen, dtype=dtype)
    return [t.to(device) for t in (u, W, bias, grad_v)]


def routing_function(variant, iterations):
    if variant == "reference":
        return lambda u, W, bias: dynamic_routing_reference(u, W, bias, iterations)
    if variant == "compiled":
        return torch.compile(lambda u, W, bias: dynamic_routing_reference(u, W, bias, iterations))
    if variant == "fused":
        return lambda u, W, bias: dynamic_routing(u, W, bias, iterations, backend="fused")
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def forward_backward_step(fn, u, W, bias, grad_v):
    def step():
        for t in (u, W, bias):
            t.grad = None
        fn(u, W, bias).backward(grad_v)

    return step


def forward_step(fn, u, W, bias):
    def step():
        with torch.no_grad():
            fn(u, W, bias)

    return step


def time_step(step, min_run_time):
    for _ in range(2):  # warm-up: compilation, allocator, caches
        step()
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _read_status_kib(field):
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1))


def peak_memory_bytes(variant, batch, device, dtype, iterations):
    """Peak memory added by one forward+backward, measured in this process."""
    fn = routing_function(variant, iterations)
    u, W, bias, grad_v = make_inputs(batch, device, dtype)
    u, W, bias = (t.requires_grad_() for t in (u, W, bias))
    step = forward_backward_step(fn, u, W, bias, grad_v)
    step()  # compile and warm up before the measured run
    for t in (u, W, bias):
        t.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the resident-set high-water mark (VmHWM)
    before = _read_status_kib("VmRSS")
    step()
    return (_read_status_kib("VmHWM") - before) * 1024


def peak_memory_in_subprocess(variant, batch, dtype, iterations):
    # A fresh process per variant: memory freed by one variant but kept by the allocator
    # would otherwise hide part of the next variant's peak.
    command = [
        sys.executable, "-m", "benchmarks.bench_routing", "--measure-memory-of", variant,
        "--batch-sizes", str(batch), "--dtype", str(dtype).removeprefix("torch."),
        "--iterations", str(iterations), "--device", "cpu",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=root).stdout
    return int(output.strip().splitlines()[-1])


def machine_description(device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE).group(1)
        except (OSError, AttributeError):
            pass
        info["device_name"] = f"{cpu}, {os.cpu_count()} cores"
    return info


def format_table(rows, info, dtype, iterations):
    lines = [
        f"# Dynamic routing benchmark: {info['device_name']}",
        "",
        f"{info['date']}; torch {info['torch']} (CUDA {info['cuda']}), python {info['python']}, "
        f"{info['threads']} threads; CapsNet shape N_in=1152, N_out=10, D_out=16, D_in=8, "
        f"r={iterations}, {str(dtype).removeprefix('torch.')}, with bias. Times: median, ms.",
        "",
        "| B | variant | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | fused speed-up fwd | fused speed-up fwd+bwd | fused memory share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fused = next(r for r in rows if r["batch"] == row["batch"] and r["variant"] == "fused")
        speed_fwd = row["fwd_s"] / fused["fwd_s"]
        speed_both = row["fwd_bwd_s"] / fused["fwd_bwd_s"]
        memory = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f}"
        share = (
            "n/a" if row["peak_bytes"] in (None, 0) or fused["peak_bytes"] is None
            else f"{fused['peak_bytes'] / row['peak_bytes']:.3f}"
        )
        lines.append(
            f"| {row['batch']} | {row['variant']} | {row['fwd_s'] * 1e3:.2f} | {row['fwd_bwd_s'] * 1e3:.2f} | "
            f"{memory} | {speed_fwd:.1f}x | {speed_both:.1f}x | {share} |"
        )
    lines += [
        "",
        "Speed-up columns: this row's time divided by the fused time at the same B (so the fused "
        "row reads 1.0x). Memory share: fused peak divided by this row's peak.",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 32 128 on cpu, 32 128 512 on cuda")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--name", default=None, help="results file name (default: derived from the device)")
    parser.add_argument("--measure-memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    batch_sizes = args.batch_sizes or ([32, 128] if args.device == "cpu" else [32, 128, 512])
    if args.measure_memory_of:  # child process of peak_memory_in_subprocess
        print(peak_memory_bytes(args.measure_memory_of, batch_sizes[0], args.device, dtype, args.iterations))
        return
    if "fused" not in args.variants:
        raise SystemExit("--variants must include fused: every ratio is relative to it")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    info = machine_description(args.device)
    rows = []
    for batch in batch_sizes:
        u, W, bias, grad_v = make_inputs(batch, args.device, dtype)
        u, W, bias = (t.requires_grad_() for t in (u, W, bias))
        for variant in args.variants:
            fn = routing_function(variant, args.iterations)
            fwd = time_step(forward_step(fn, u, W, bias), args.min_run_time)
            fwd_bwd = time_step(forward_backward_step(fn, u, W, bias, grad_v), args.min_run_time)
            if args.no_memory:
                peak = None
            elif args.device == "cuda":
                peak = peak_memory_bytes(variant, batch, "cuda", dtype, args.iterations)
            else:
                peak = peak_memory_in_subprocess(variant, batch, dtype, args.iterations)
            rows.append(dict(batch=batch, variant=variant, fwd_s=fwd, fwd_bwd_s=fwd_bwd, peak_bytes=peak))
            print(f"B={batch} {variant}: fwd {fwd * 1e3:.2f} ms, fwd+bwd {fwd_bwd * 1e3:.2f} ms, "
                  f"peak {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'}", flush=True)
    table = format_table(rows, info, dtype, args.iterations)
    print()
    print(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    name = args.name or f"{args.device}-{re.sub(r'[^A-Za-z0-9]+', '-', info['device_name']).strip('-').lower()}"
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as out:
        out.write(table + "\n")
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as out:
        json.dump(dict(machine=info, dtype=args.dtype, iterations=args.iterations, rows=rows), out, indent=2)
    print(f"\nwritten: benchmarks/results/{name}.md and .json")


if __name__ == "__main__":
    main()
