"""Does staging W and u in shared memory hide the routing kernels' per-input round trip? (a GPU experiment)

    python -m benchmarks.staging_experiment [--batch-sizes 32 128 512 1024] [--out DIR]

The question it answers, before the library's kernels are changed: on the H200 the routing
kernels took about 1.3 us per input capsule where their instructions issue in 0.4
(docs/CUDA.md, "Measured on an H200"), and their loop waits for W and u to come from L2
once per input. ``benchmarks/staging_kernels/input_loop.cu`` holds two versions of the loop
of ``forward_iteration_kernel<kUniformFirst>`` (float32, CapsNet tile, the library's
``add_prediction``): loads from global memory where they are used (stages 0, as the library
does), and a ring of 2, 3 or 4 slots in shared memory filled with asynchronous copies
(``cp.async``) while the previous inputs are computed. The chunks are the library's plan
for this GPU (the real planner, through the CPU emulation module); the kernels store the
chunks' partial sums without adding them up, so the loop is what is timed.

For each batch size: every version's partial sums must be bitwise equal to the direct
version's (the same multiply-adds in the same order) and agree with a float64 einsum; the
median time of a launch (CUDA events, versions interleaved in rounds), per launch and per
input of a chunk. Writes ``staging.md`` and ``staging.json`` into ``--out``. Needs a CUDA
device and nvcc (it builds the kernels with ``torch.utils.cpp_extension.load``, about a
minute).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

import torch

from benchmarks import cuda_model
from benchmarks.machine import describe, machine_context

KERNELS = pathlib.Path(__file__).resolve().parent / "staging_kernels"
STAGES = (0, 2, 3, 4)
# The direct loop's sums against float64: 144 inputs x 8 float32 multiply-adds per component
# at most, relative to the largest sum, stay near 1e-7; a wrong input or slot is off by O(1).
MAX_RELATIVE_ERROR = 1e-5
CAPSNET = cuda_model.CAPSNET_SHAPE


def build():
    """The experiment's extension, built for the current device (its build folder under
    ~/.cache/capsnet, never in the repository)."""
    from torch.utils.cpp_extension import load

    directory = os.path.join(os.path.expanduser("~"), ".cache", "capsnet", f"staging-torch-{torch.__version__}")
    os.makedirs(directory, exist_ok=True)
    return load(
        name="capsnet_staging_experiment",
        sources=[str(KERNELS / "binding.cpp"), str(KERNELS / "input_loop.cu")],
        extra_include_paths=[str(cuda_model.CSRC), str(KERNELS)],
        # setup.py's nvcc flags: the loop compiles as it does in the library.
        extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-fmad=false"],
        build_directory=directory,
    )


def inputs_per_chunk(batch: int) -> int:
    """The chunk size the library's planner gives a float32 CapsNet-shape call on this GPU."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return int(cuda_model.describe_plan(batch, CAPSNET, 3, 4, sms)["inputs_per_chunk"])


def reference_partials(u: torch.Tensor, W: torch.Tensor, chunk: int) -> torch.Tensor:
    """[chunks, B, J, D]: each chunk's sum over its inputs of W[i, j] u[b, i], in float64."""
    num_in = u.shape[1]
    chunks = -(-num_in // chunk)
    pad = chunks * chunk - num_in
    u64 = torch.nn.functional.pad(u.double(), (0, 0, 0, pad)).view(u.shape[0], chunks, chunk, -1)
    W64 = torch.nn.functional.pad(W.double(), (0, 0, 0, 0, 0, 0, 0, pad)).view(chunks, chunk, *W.shape[1:])
    return torch.einsum("bcke,ckjde->cbjd", u64, W64)


def time_versions(module, u, W, chunk: int, rounds: int, launches: int) -> dict[int, float]:
    """{stages: median microseconds per launch}, the versions timed in turn within each round."""
    for stages in STAGES:
        for _ in range(3):
            module.input_loop(u, W, chunk, stages)
    times: dict[int, list[float]] = {stages: [] for stages in STAGES}
    for _ in range(rounds):
        for stages in STAGES:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(launches):
                module.input_loop(u, W, chunk, stages)
            end.record()
            end.synchronize()
            times[stages].append(start.elapsed_time(end) * 1e3 / launches)
    return {stages: statistics.median(values) for stages, values in times.items()}


def run(batch: int, module, rounds: int, launches: int) -> dict:
    chunk = inputs_per_chunk(batch)
    generator = torch.Generator(device="cuda").manual_seed(batch)
    u = torch.randn(batch, CAPSNET["num_in"], CAPSNET["dim_in"], device="cuda", generator=generator)
    W = torch.randn(CAPSNET["num_in"], CAPSNET["num_out"], CAPSNET["dim_out"], CAPSNET["dim_in"], device="cuda",
                    generator=generator) * 0.1
    direct = module.input_loop(u, W, chunk, 0)
    reference = reference_partials(u, W, chunk)
    error = ((direct.double() - reference).abs().max() / reference.abs().max()).item()
    bitwise = {stages: bool(torch.equal(module.input_loop(u, W, chunk, stages), direct)) for stages in STAGES}
    times = time_versions(module, u, W, chunk, rounds, launches)
    return {
        "batch": batch, "chunks": -(-CAPSNET["num_in"] // chunk), "inputs_per_chunk": chunk,
        "max_relative_error_vs_float64": error, "bitwise_equal_to_direct": bitwise,
        "microseconds": times, "microseconds_per_input": {stages: t / chunk for stages, t in times.items()},
    }


def format_results(rows: list[dict]) -> list[str]:
    lines = [
        "| B | chunks x inputs | " + " | ".join(f"{s} stages us (per input)" if s else "direct us (per input)" for s in STAGES)
        + " | best / direct | bitwise equal | error vs float64 |",
        "|---" * (len(STAGES) + 5) + "|",
    ]
    for row in rows:
        times = row["microseconds"]
        best = min(times[s] for s in STAGES if s)
        cells = [f"{times[s]:.1f} ({row['microseconds_per_input'][s]:.2f})" for s in STAGES]
        equal = "yes" if all(row["bitwise_equal_to_direct"].values()) else "NO: " + ", ".join(
            str(s) for s, ok in row["bitwise_equal_to_direct"].items() if not ok)
        lines.append(f"| {row['batch']} | {row['chunks']} x {row['inputs_per_chunk']} | " + " | ".join(cells)
                     + f" | {best / times[0]:.2f} | {equal} | {row['max_relative_error_vs_float64']:.1e} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512, 1024])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--launches", type=int, default=50, help="launches per timed round")
    parser.add_argument("--out", default=None, help="folder for staging.md and staging.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("staging_experiment: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    context = machine_context("cuda")
    module = build()
    rows = [run(batch, module, args.rounds, args.launches) for batch in args.batch_sizes]
    lines = describe(context) + [
        "",
        f"The input loop of forward_iteration_kernel<kUniformFirst> (float32, CapsNet shape), "
        f"median of {args.rounds} rounds of {args.launches} launches:",
        "",
        *format_results(rows),
    ]
    print("\n".join(lines))
    failed = [row["batch"] for row in rows if not all(row["bitwise_equal_to_direct"].values())
              or row["max_relative_error_vs_float64"] > MAX_RELATIVE_ERROR]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        pathlib.Path(args.out, "staging.md").write_text("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "staging.json"), "w") as f:
            json.dump({"context": context, "results": rows}, f, indent=2, default=str)
    if failed:
        print(f"staging_experiment: the staged loop's sums are wrong at B in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
