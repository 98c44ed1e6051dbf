"""Fused routing vs the eager reference vs torch.compile(reference): the ratio table.

    python -m benchmarks.bench_routing --device cpu               # B in {1, 32, 128}  (make bench)
    python -m benchmarks.bench_routing --device cuda --batch-sizes 32 128 512

Times come from torch.utils.benchmark (it synchronises CUDA), as the median of blocked runs;
"fwd" is the forward alone under no_grad, "fwd+bwd" a forward and a backward into all three
inputs. Peak memory is that of forward+backward, in a fresh process per variant on the CPU
(see benchmarks/memory.py). The header records the machine (benchmarks/machine.py) and the
torch.mm rate measured in the same run, from which the FLOP floor of the fused forward
follows. The table is printed and written to benchmarks/results/<machine>.md and .json.
For the pytest-benchmark form (saved runs, --benchmark-compare) see test_routing_benchmarks.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.utils.benchmark as torch_benchmark

from benchmarks.machine import describe, machine_context, results_name, torch_mm_gflops
from benchmarks.memory import forward_backward_peak, peak_in_fresh_process
from benchmarks.routing_cases import (
    CAPSNET,
    VARIANTS,
    forward_backward_step,
    forward_flops,
    forward_step,
    make_inputs,
    routing_function,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_step(step, min_run_time):
    for _ in range(2):  # warm-up: compilation, allocator, caches
        step()
    timer = torch_benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def floor_rows(rows, iterations, mm_gflops):
    """The fused forward's time over its FLOP floor (forward_flops at the torch.mm rate), per B."""
    floors = []
    for row in rows:
        if row["variant"] != "fused":
            continue
        flops = forward_flops(CAPSNET, row["batch"], iterations)
        floor_s = flops / (mm_gflops * 1e9)
        floors.append(dict(batch=row["batch"], flops=flops, floor_s=floor_s, ratio=row["fwd_s"] / floor_s))
    return floors


def format_table(rows, floors, context, dtype, iterations):
    lines = [
        f"# Dynamic routing benchmark: {context['cpu_model']}, {context['cpu_cores']} cores"
        + (f", {context['device_name']}" if context["device"] == "cuda" else ""),
        "",
        *describe(context),
        "",
        f"CapsNet shape {CAPSNET.describe()}, r={iterations}, {str(dtype).removeprefix('torch.')}, with bias, "
        f"on {context['device']}. Times: median, ms.",
        "",
        "| B | variant | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | fused speed-up fwd | fused speed-up fwd+bwd | fused memory share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fused = next(r for r in rows if r["batch"] == row["batch"] and r["variant"] == "fused")
        memory = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f}"
        share = (
            "n/a" if row["peak_bytes"] in (None, 0) or fused["peak_bytes"] is None
            else f"{fused['peak_bytes'] / row['peak_bytes']:.3f}"
        )
        lines.append(
            f"| {row['batch']} | {row['variant']} | {row['fwd_s'] * 1e3:.2f} | {row['fwd_bwd_s'] * 1e3:.2f} | "
            f"{memory} | {row['fwd_s'] / fused['fwd_s']:.1f}x | {row['fwd_bwd_s'] / fused['fwd_bwd_s']:.1f}x | {share} |"
        )
    lines += [
        "",
        "Speed-up columns: this row's time divided by the fused time at the same B (the fused row "
        "reads 1.0x). Memory share: fused peak divided by this row's peak.",
        "",
        "FLOP floor of the fused forward (its multiply-adds at the torch.mm rate of this run; "
        "ratio = fused fwd time / floor time):",
        "",
    ]
    lines += [
        f"- B={f['batch']}: {f['flops'] / 1e9:.3f} GFLOP, floor {f['floor_s'] * 1e3:.2f} ms, "
        f"fused fwd {f['ratio']:.2f}x the floor"
        for f in floors
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 1 32 128 on cpu, 32 128 512 on cuda")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["reference", "compiled", "fused"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--name", default=None, help="results file name (default: derived from the machine)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the .md and .json go (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    batch_sizes = args.batch_sizes or ([1, 32, 128] if args.device == "cpu" else [32, 128, 512])
    if "fused" not in args.variants:
        raise SystemExit("--variants must include fused: every ratio is relative to it")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    mm_gflops = torch_mm_gflops(args.device)
    context = machine_context(args.device, mm_gflops)
    print("\n".join(describe(context)), flush=True)
    rows = []
    for batch in batch_sizes:
        u, W, bias, grad_v = make_inputs(CAPSNET, batch, args.device, dtype)
        u, W, bias = (t.requires_grad_() for t in (u, W, bias))
        for variant in args.variants:
            fn = routing_function(variant, args.iterations)
            fwd = time_step(forward_step(fn, u, W, bias), args.min_run_time)
            fwd_bwd = time_step(forward_backward_step(fn, u, W, bias, grad_v), args.min_run_time)
            if args.no_memory:
                peak = None
            elif args.device == "cuda":
                peak = forward_backward_peak(variant, CAPSNET, batch, "cuda", dtype, args.iterations)
            else:
                peak = peak_in_fresh_process(variant, CAPSNET, batch, dtype, args.iterations)
            rows.append(dict(batch=batch, variant=variant, fwd_s=fwd, fwd_bwd_s=fwd_bwd, peak_bytes=peak))
            print(f"B={batch} {variant}: fwd {fwd * 1e3:.2f} ms, fwd+bwd {fwd_bwd * 1e3:.2f} ms, "
                  f"peak {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'}", flush=True)
    floors = floor_rows(rows, args.iterations, mm_gflops)
    table = format_table(rows, floors, context, dtype, args.iterations)
    print()
    print(table)
    os.makedirs(args.results_dir, exist_ok=True)
    name = args.name or results_name(context)
    with open(os.path.join(args.results_dir, f"{name}.md"), "w") as out:
        out.write(table + "\n")
    with open(os.path.join(args.results_dir, f"{name}.json"), "w") as out:
        json.dump(dict(machine=context, shape=CAPSNET.describe(), dtype=args.dtype, iterations=args.iterations,
                       rows=rows, fused_forward_floor=floors), out, indent=2)
    print(f"\nwritten: {os.path.join(args.results_dir, name)}.md and .json")


if __name__ == "__main__":
    main()
