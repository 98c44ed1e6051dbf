"""Memory of forward+backward at the large shape of issue 9, fused vs the eager reference.

    python -m benchmarks.large_shape_memory          # part of `make bench`

B=128, N_in=3872, N_out=196, D_in=8, D_out=16, float32, CPU, 3 iterations, no bias.

- fused: the peak resident-set rise of one forward+backward, measured in a fresh process
  (warmed up at B=1 first). It includes the gradient of W (N_in N_out D_out D_in floats,
  388 MB here), which any backward must produce.
- reference: not run at B=128 (it would need tens of GB on a 24 GB machine). Two estimates:
  (1) what autograd keeps after the forward: the reference run on the meta device at full
  size, summing the distinct storages handed to autograd's saved-tensor hooks (exact, and a
  lower bound of the peak, which the backward's temporaries add to); (2) the measured peak
  rise at B = 8, 16, 24 (a fresh process each), fitted by least squares to a + b B and
  extrapolated to B=128. The peak is the largest of the step's phases; from B ~ 4 on it is
  set by the phases holding the [B, N_in, N_out, D_out] predictions and products, which grow
  linearly with B (below that, the backward's B-independent W-gradient phase sets it, so
  smaller B would not extrapolate). The largest residual of the fit is printed as a check.

Results: printed, and written to benchmarks/results/<machine>-large-shape.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.machine import describe, machine_context, results_name
from benchmarks.memory import peak_in_fresh_process
from benchmarks.routing_cases import LARGE
from capsnet import dynamic_routing_reference

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GiB = 2**30


def autograd_saved_bytes(batch: int, iterations: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd saves during the reference forward (meta device,
    so nothing is allocated), not counting the inputs u and W themselves."""
    u = torch.empty(batch, LARGE.num_in, LARGE.dim_in, device="meta", dtype=dtype, requires_grad=True)
    W = torch.empty(LARGE.num_in, LARGE.num_out, LARGE.dim_out, LARGE.dim_in, device="meta", dtype=dtype,
                    requires_grad=True)
    # Storage identity: meta storages have no data pointer, so use the storage object's handle.
    inputs = {u.untyped_storage()._cdata, W.untyped_storage()._cdata}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in inputs:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        dynamic_routing_reference(u, W, None, iterations)
    return sum(saved.values())


def linear_fit(xs, ys):
    """Least-squares a + b x."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def measure(batch, small_batches, iterations, dtype):
    fused = peak_in_fresh_process("fused", LARGE, batch, dtype, iterations, warmup_batch=1)
    print(f"fused, B={batch}: peak rise {fused / GiB:.3f} GiB (measured)", flush=True)
    saved = autograd_saved_bytes(batch, iterations, dtype)
    print(f"reference, B={batch}: autograd keeps {saved / GiB:.2f} GiB after the forward "
          "(meta-device count of saved tensors)", flush=True)
    small = []
    for small_batch in small_batches:
        peak = peak_in_fresh_process("reference", LARGE, small_batch, dtype, iterations, warmup_batch=1)
        small.append(peak)
        print(f"reference, B={small_batch}: peak rise {peak / GiB:.3f} GiB (measured)", flush=True)
    intercept, slope = linear_fit(small_batches, small)
    residual = max(abs(intercept + slope * b - p) for b, p in zip(small_batches, small))
    return dict(
        batch=batch,
        fused_peak_bytes=fused,
        reference_saved_bytes=saved,
        reference_small_batches=list(small_batches),
        reference_small_peak_bytes=small,
        reference_fit_bytes=dict(intercept=intercept, per_sample=slope, max_residual=residual),
        reference_extrapolated_peak_bytes=intercept + slope * batch,
    )


def format_report(result, context, iterations, dtype):
    batch = result["batch"]
    fit = result["reference_fit_bytes"]
    extrapolated = result["reference_extrapolated_peak_bytes"]
    fused = result["fused_peak_bytes"]
    weight_bytes = LARGE.num_in * LARGE.num_out * LARGE.dim_out * LARGE.dim_in * dtype.itemsize
    small = ", ".join(
        f"B={b}: {p / GiB:.3f}"
        for b, p in zip(result["reference_small_batches"], result["reference_small_peak_bytes"])
    )
    return "\n".join([
        f"# Large-shape memory: {context['cpu_model']}, {context['cpu_cores']} cores",
        "",
        *describe(context),
        "",
        f"Forward+backward at B={batch}, {LARGE.describe()}, r={iterations}, "
        f"{str(dtype).removeprefix('torch.')}, no bias, CPU.",
        "",
        "| variant | peak memory rise, GiB | how it was obtained |",
        "|---|---|---|",
        f"| fused | {fused / GiB:.3f} | measured: resident-set peak rise of one forward+backward in a fresh "
        f"process (includes the {weight_bytes / GiB:.2f} GiB gradient of W) |",
        f"| reference | {extrapolated / GiB:.1f} | extrapolated: measured at small B ({small} GiB), least-squares "
        f"fit {fit['intercept'] / GiB:.3f} GiB + {fit['per_sample'] / 2**20:.1f} MiB x B (largest residual "
        f"{fit['max_residual'] / 2**20:.1f} MiB), evaluated at B={batch} |",
        f"| reference, saved by autograd | {result['reference_saved_bytes'] / GiB:.2f} | computed: distinct "
        "storages saved for backward during the forward at full size (meta device); a lower bound of the peak |",
        "",
        f"Fused / reference (extrapolated): {fused / extrapolated:.3f}.",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--small-batches", type=int, nargs="+", default=[8, 16, 24],
                        help="batch sizes at which the reference is measured, for the extrapolation")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--name", default=None, help="results file name (default: derived from the machine)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the .md and .json go (default: %(default)s)")
    args = parser.parse_args(argv)
    dtype = torch.float32
    context = machine_context("cpu")
    print("\n".join(describe(context)), flush=True)
    result = measure(args.batch, args.small_batches, args.iterations, dtype)
    report = format_report(result, context, args.iterations, dtype)
    print()
    print(report)
    os.makedirs(args.results_dir, exist_ok=True)
    name = args.name or f"{results_name(context)}-large-shape"
    with open(os.path.join(args.results_dir, f"{name}.md"), "w") as out:
        out.write(report + "\n")
    with open(os.path.join(args.results_dir, f"{name}.json"), "w") as out:
        json.dump(dict(machine=context, shape=LARGE.describe(), dtype="float32", iterations=args.iterations,
                       **result), out, indent=2)
    print(f"\nwritten: {os.path.join(args.results_dir, name)}.md and .json")


if __name__ == "__main__":
    main()
