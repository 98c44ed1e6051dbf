"""How the CUDA kernels' times depend on the launch plan's choices (a GPU experiment).

    python -m benchmarks.plan_sweep [--batch-sizes 32 128 512 1024] [--steps 10] [--out DIR]
    python -m benchmarks.plan_sweep --dry-run      # no GPU: the plans only, to check the script

Why: on the H200 each routing launch took about one block's critical path, which grows with
the inputs per chunk and with the chunk tree's depth (docs/CUDA.md, "Measured on an H200"),
but a fit over batch sizes could not tell the two apart, because the planner trades one
against the other; and the gradient kernel's time followed its waves of blocks times its
samples per group, which its planner does not minimise. This sweep sets the planner's
choices through ``CAPSNET_CUDA_PLAN`` (csrc/cuda/routing_host.h), at each batch size:

- the inputs per chunk: the planner's choice times 1/4, 1/2, 1, 2 and 4 (within [1, N_in]),
  and the fewest that give every SM at most one block (at B = 32 on the H200 one block per
  SM, with twice the inputs, was faster than two; the planner's cost weighs the two since);
- the gradient kernel's sample groups: 1, 2, 4, 8;

and times every kernel of a CapsNet-shape float32 forward + backward (r = 3) with
torch.profiler (``benchmarks/cuda_profile.py``'s ``measure``). Per routing kernel and batch
size, a least-squares fit over the chunk sizes, time per step = a + b x inputs per chunk +
c x tree levels, gives the cost of an input (b) and of a tree level (c) apart. The plans come
from the real planner with the same choices (through the CPU emulation module). Writes
``plan-sweep.md`` and ``plan-sweep.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from benchmarks import cuda_model
from benchmarks.cuda_profile import measure

CAPSNET = cuda_model.CAPSNET_SHAPE
CHUNK_FACTORS = (0.25, 0.5, 1, 2, 4)
SAMPLE_GROUPS = (1, 2, 4, 8)
ROUTING_KERNELS = (
    "forward_iteration_kernel<kUniformFirst>", "forward_iteration_kernel<kLater>",
    "backward_sweep_kernel<kFirstLogitGrads>", "backward_sweep_kernel<kLogitGrads>",
)
GRADIENT_KERNEL = "gradient_kernel"


@contextlib.contextmanager
def plan_choices(text: str):
    """CAPSNET_CUDA_PLAN = text inside the block (the kernels read it on every call)."""
    before = os.environ.get("CAPSNET_CUDA_PLAN")
    os.environ["CAPSNET_CUDA_PLAN"] = text
    try:
        yield
    finally:
        if before is None:
            del os.environ["CAPSNET_CUDA_PLAN"]
        else:
            os.environ["CAPSNET_CUDA_PLAN"] = before


def describe(batch: int, sms: int) -> dict:
    """The plan the kernels get for this batch under the current CAPSNET_CUDA_PLAN."""
    plan = cuda_model.describe_plan(batch, CAPSNET, 3, 4, sms)
    keys = ("inputs_per_chunk", "num_chunks", "chunk_levels", "sample_groups", "sample_tiles")
    return {key: int(plan[key]) for key in keys}


def one_block_per_sm(sample_tiles: int, sms: int) -> int:
    """The fewest inputs per chunk with which the routing launch has at most one block per SM."""
    chunks = max(1, sms // sample_tiles)
    return -(-CAPSNET["num_in"] // chunks)


def choices_for(batch: int, sms: int) -> list[str]:
    """The CAPSNET_CUDA_PLAN values of the sweep at this batch size ("" is the planner's own)."""
    planned = describe(batch, sms)
    chunk_sizes = {min(max(1, round(planned["inputs_per_chunk"] * f)), CAPSNET["num_in"]) for f in CHUNK_FACTORS}
    chunk_sizes.add(one_block_per_sm(planned["sample_tiles"], sms))
    chunk_sizes.discard(planned["inputs_per_chunk"])
    groups = [g for g in SAMPLE_GROUPS if g != planned["sample_groups"]]
    return [""] + [f"inputs_per_chunk={n}" for n in sorted(chunk_sizes)] + [f"sample_groups={g}" for g in groups]


def fit_chunk_costs(rows: list[dict], kernel: str) -> dict | None:
    """{a, b, c}: time per step = a + b x inputs per chunk + c x levels, least squares over the
    rows that share the gradient kernel's default plan (the chunk-size rows), or None."""
    points = [(r["plan"]["inputs_per_chunk"], r["plan"]["chunk_levels"], r["us"][kernel])
              for r in rows if not r["choices"].startswith("sample_groups") and kernel in r["us"]]
    if len(points) < 3:
        return None
    design = torch.tensor([[1.0, inputs, levels] for inputs, levels, _ in points], dtype=torch.float64)
    times = torch.tensor([[t] for _, _, t in points], dtype=torch.float64)
    solution = torch.linalg.lstsq(design, times).solution.flatten().tolist()
    return dict(zip("abc", solution))


def format_rows(batch: int, rows: list[dict], kernels: list[str]) -> list[str]:
    header = ["CAPSNET_CUDA_PLAN", "chunks x inputs", "levels", "sample groups", *kernels, "total"]
    lines = [f"B = {batch}:", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        plan, us = row["plan"], row["us"]
        cells = [row["choices"] or "(the planner)", f"{plan['num_chunks']} x {plan['inputs_per_chunk']}",
                 str(plan["chunk_levels"]), str(plan["sample_groups"]),
                 *(f"{us[k]:.1f}" if k in us else "n/a" for k in kernels), f"{sum(us.values()):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    fits = [(k, fit_chunk_costs(rows, k)) for k in ROUTING_KERNELS]
    if any(fit for _, fit in fits):
        lines += ["", "| kernel | a us | b us per input | c us per level |", "|---|---|---|---|"]
        lines += [f"| {k} | {f['a']:.1f} | {f['b']:.2f} | {f['c']:.2f} |" for k, f in fits if f]
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512, 1024])
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per plan")
    parser.add_argument("--out", default=None, help="folder for plan-sweep.md and plan-sweep.json")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: list the plans (as on 132 SMs)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("plan_sweep: needs a CUDA device (--dry-run lists the plans without one)", file=sys.stderr)
        return 2
    if "CAPSNET_CUDA_PLAN" in os.environ:
        print("plan_sweep: unset CAPSNET_CUDA_PLAN first: the sweep sets it", file=sys.stderr)
        return 2
    sms = 132 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    device = "no GPU (dry run, 132 SMs)" if args.dry_run else torch.cuda.get_device_name()
    lines = [f"Kernel times (us per CapsNet-shape float32 forward + backward, r = 3) under each plan, on {device}.", ""]
    results = []
    for batch in args.batch_sizes:
        rows = []
        for choices in choices_for(batch, sms):
            with plan_choices(choices):
                plan = describe(batch, sms)
                us = {} if args.dry_run else measure(batch, args.steps)
            rows.append(dict(choices=choices, plan=plan, us=us))
            print(f"B={batch} {choices or '(the planner)'}: {plan}, {sum(us.values()):.1f} us", flush=True)
        kernels = [k for k in (*ROUTING_KERNELS, GRADIENT_KERNEL) if any(k in r["us"] for r in rows)]
        lines += format_rows(batch, rows, kernels)
        results.append(dict(batch=batch, rows=rows, fits={k: fit_chunk_costs(rows, k) for k in ROUTING_KERNELS}))
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "plan-sweep.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "plan-sweep.json"), "w") as f:
            json.dump(dict(device=device, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
