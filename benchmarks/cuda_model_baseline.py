"""The static model (benchmarks/cuda_model.py) applied to the kernels before this rework.

    python -m benchmarks.cuda_model_baseline /path/to/old/checkout   # e.g. a checkout of 0cfa852

Those kernels (csrc/cuda/routing_kernel.cuh of commit 0cfa852 and earlier; c42e625 changed
the math seam under them, and its copy no longer compiles) carry no
``model-loop`` comments and had their own planner: the loop trip counts and the launch plan
of the CapsNet shape at B=128 on an H100 are written out here from that source
(routing_launch.h: 32 samples x 10 capsules per block, 64 chunks of 18 inputs, couplings
staged 8 inputs at a time, grad_weight 5 inputs per block and 160 threads, grad_input one
round of 8 dimensions). Same compiler, same per-launch arithmetic as the current model.
Branches taken at run time count both ways, as in the current model, except the coupling
step's loops at iteration 0 (which that code skipped at run time).
"""

from __future__ import annotations

import math
import pathlib
import sys
import tempfile

from benchmarks import cuda_model as model

B, I, J, D, E, R = 128, 1152, 10, 16, 8, 3
CHUNKS, INPUTS_PER_CHUNK, RUN = 64, 18, 8
RUNS = math.ceil(INPUTS_PER_CHUNK / RUN)

SOURCE = """#include "cuda/routing_kernel.cuh"
namespace capsnet::cuda {
template __global__ void forward_partial_sums_kernel<float, CapsNetTile>(const ForwardParams<float>);
template __global__ void forward_squash_kernel<float>(const ForwardParams<float>);
template __global__ void backward_squash_kernel<float>(const BackwardParams<float>);
template __global__ void backward_partial_sums_kernel<float, CapsNetTile>(const BackwardParams<float>);
template __global__ void grad_weight_kernel<float, CapsNetTile>(const BackwardParams<float>);
template __global__ void grad_input_kernel<float, CapsNetTile>(const BackwardParams<float>);
}
"""


def markers(k: int) -> dict:
    """Trip counts per back-edge line of the old routing_kernel.cuh, for forward iteration k."""
    f = "routing_kernel.cuh"
    softmax = 0 if k == 0 else 1
    return {
        (f, 212): str(k), (f, 259): str((J - 1) * softmax), (f, 266): str(J * softmax),
        (f, 292): str(math.ceil(B // 4 * J * RUN / (32 * J) / 1)), (f, 353): str(RUNS), (f, 355): str(INPUTS_PER_CHUNK / RUNS),
        (f, 389): "1", (f, 391): str(CHUNKS), (f, 403): str(1 / 5), (f, 406): str(D), (f, 411): str(D),
        (f, 444): "1", (f, 449): "1", (f, 451): str(CHUNKS), (f, 460): str(1 / 5), (f, 464): str(D), (f, 470): str(D),
        (f, 500): str(INPUTS_PER_CHUNK), (f, 510): str(J),
        (f, 545): "1", (f, 555): str(B), (f, 567): str(R - 1),
        (f, 619): str(INPUTS_PER_CHUNK), (f, 631): str(R - 1), (f, 660): "1", (f, 669): str(min(8, J) / J), (f, 671): str(J),
    }


ROUTING = dict(grid=(4, CHUNKS, 1), block=(32, J, 1))
LAUNCHES = {  # kernel: (config, launches in the forward, in the backward)
    "forward_partial_sums_kernel": (dict(ROUTING, shared_bytes=2560 + 11520), 3, 0),
    "forward_squash_kernel": (dict(grid=(B, 1, 1), block=(160, 1, 1), shared_bytes=0), 3, 0),
    "backward_squash_kernel": (dict(grid=(B, 1, 1), block=(160, 1, 1), shared_bytes=0), 0, 3),
    "backward_partial_sums_kernel": (dict(ROUTING, shared_bytes=2560), 0, 2),
    "grad_weight_kernel": (dict(grid=(math.ceil(I / 5), 1, 1), block=(160, 1, 1), shared_bytes=0), 0, 1),
    "grad_input_kernel": (dict(ROUTING, shared_bytes=10240), 0, 1),
}


def main(argv=None) -> int:
    root = pathlib.Path((argv or sys.argv[1:] or ["/work/baseline"])[0]) / "csrc"
    gpu = model.GPUS["sm_90"]
    with tempfile.TemporaryDirectory() as workdir:
        resources, sass = model.compile_kernels(SOURCE, "sm_90", workdir, root)
    functions = model.parse_sass(sass)
    rows = []
    for kernel, (config, forward_count, backward_count) in LAUNCHES.items():
        mangled = next(m for m in functions if f"{len(kernel)}{kernel}" in m)
        instructions, labels = functions[mangled]
        row = model.KernelEstimate(kernel + (" (fwd)" if forward_count else ""))
        for k in range(forward_count + backward_count):
            weights = model.loop_weights(mangled, instructions, labels, {}, markers(k if forward_count else 1))
            classes: dict[str, float] = {}
            for ins, weight in zip(instructions, weights):
                cls = model.instruction_class(ins)
                classes[cls] = classes.get(cls, 0.0) + weight
            cost = model.cost_of_launch(gpu, resources[mangled], classes, config)
            row.launches += 1
            row.registers, row.spill_bytes = resources[mangled].registers, resources[mangled].spill_bytes
            row.blocks, row.blocks_per_sm = cost.blocks, cost.resident
            row.waves = cost.blocks / (cost.resident * gpu.multiprocessors)
            row.warp_instructions += cost.blocks * cost.warps * cost.per_warp
            for cls, count in classes.items():
                row.classes[cls] = row.classes.get(cls, 0.0) + cost.blocks * cost.warps * count
            row.microseconds += cost.microseconds
            row.bound = cost.bound
        rows.append(row)
    forward = [r for r in rows if r.kernel.endswith("(fwd)")]
    backward = [r for r in rows if not r.kernel.endswith("(fwd)")]
    print(model.format_table("forward (kernels before the rework)", forward))
    print()
    print(model.format_table("backward (kernels before the rework)", backward))
    fwd, bwd = sum(r.microseconds for r in forward), sum(r.microseconds for r in backward)
    print(f"\nforward {fwd:.1f} us, backward {bwd:.1f} us")
    print(f"sm_90 B={B} fwd+bwd estimate (before): {fwd + bwd:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
