"""The per-call cost of the Python layers around the fused op, on a shape too small to compute.

    python -m benchmarks.call_overhead [--device cuda] [--rounds 7] [--steps 300]

One forward + backward of dynamic routing on a tiny shape (B = 1, N_in = 8, N_out = 10,
D_out = 16, D_in = 8, r = 3), where the kernels take a few microseconds: what is left is
the cost of the layers between Python and the kernels. Three paths, timed alternately in
one process (rounds of ``--steps`` steps each; the medians): ``dynamic_routing`` as a
training step calls it (capsnet.ops._EagerFusedRouting), the same through
``_FusedRouting`` (the autograd.Function used under the torch.func transforms, which binds
its arguments to forward's signature on every call and calls the ops through their Python
Autograd kernels), and the pure-PyTorch reference. On a GPU the kernels run
asynchronously: each step ends with a synchronisation, as a training step's loss does.

On a GPU, also the CapsNet shape at B = 32 and 128: the fused forward + backward as called
eagerly, and the same step captured once in a CUDA graph and replayed, which leaves the
kernels' time and none of the host's (what ``torch.compile(mode="reduce-overhead")`` aims
at).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.machine import describe, machine_context
from benchmarks.routing_cases import CAPSNET, RoutingShape, make_inputs, synchronize_after
from capsnet import dynamic_routing
from capsnet import ops as capsnet_ops

TINY = RoutingShape("tiny", num_in=8, num_out=10, dim_out=16, dim_in=8)
ITERATIONS = 3


def make_steps(device: str) -> dict:
    """{path name: one forward + backward step}."""
    u, W, bias, grad_v = make_inputs(TINY, 1, device, torch.float32)
    leaves = [t.requires_grad_() for t in (u, W, bias)]
    r = ITERATIONS

    def through(function):
        def step():
            v, _, _ = function.apply(*leaves, None, r, False, False, False)
            torch.autograd.grad(v, leaves, grad_v)

        return step

    def dynamic(backend):
        def step():
            torch.autograd.grad(dynamic_routing(*leaves, r, backend=backend), leaves, grad_v)

        return step

    steps = {
        "dynamic_routing (fused)": dynamic("fused"),
        "_FusedRouting (torch.func's path)": through(capsnet_ops._FusedRouting),
        "dynamic_routing (reference)": dynamic("reference"),
    }
    return {name: synchronize_after(step, device) for name, step in steps.items()}


def capsnet_steps(batch: int) -> dict:
    """{path: one CapsNet-shape forward + backward on the GPU, ending synchronised}: eager, and
    replaying a CUDA graph of it."""
    u, W, bias, grad_v = make_inputs(CAPSNET, batch, "cuda", torch.float32)
    leaves = [t.requires_grad_() for t in (u, W, bias)]

    def step():
        return torch.autograd.grad(dynamic_routing(*leaves, ITERATIONS, backend="fused"), leaves, grad_v)

    side = torch.cuda.Stream()  # torch.cuda.graph asks for a warm-up on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    # The graph reads `leaves` and `grad_v` at the addresses it captured and holds no
    # reference to them: `step`, in the same dict as the replay, keeps them alive.
    return {
        f"B={batch} eager": synchronize_after(step, "cuda"),
        f"B={batch} CUDA graph replay": synchronize_after(graph.replay, "cuda"),
    }


def measure(steps: dict, rounds: int, count: int) -> dict[str, float]:
    """{path: median microseconds per step}, the paths timed in turn within each round."""
    for step in steps.values():
        for _ in range(20):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(count):
                step()
            times[name].append((time.perf_counter() - start) / count * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the layers run on one thread; keep the kernels' share small and steady
    context = machine_context(args.device)
    print("\n".join(describe(context)))
    shape = f"B=1, {TINY.describe()}, r={ITERATIONS}"
    print(f"forward + backward, {shape}, float32, {args.device}, 1 torch thread; median of {args.rounds} rounds:")
    results = measure(make_steps(args.device), args.rounds, args.steps)
    fused = results["dynamic_routing (fused)"]
    for name, microseconds in results.items():
        print(f"  {name}: {microseconds:.1f} us per step ({microseconds / fused:.2f}x dynamic_routing's fused path)")
    if torch.device(args.device).type == "cuda":
        print(f"{CAPSNET.describe()}, r={ITERATIONS}, float32, fused forward + backward:")
        for batch in (32, 128):
            graph_results = measure(capsnet_steps(batch), args.rounds, max(1, args.steps // 10))
            eager, replay = graph_results.values()
            print(f"  B={batch}: eager {eager:.1f} us, CUDA graph replay {replay:.1f} us "
                  f"(the host's share of the eager step: {1 - replay / eager:.0%})")


if __name__ == "__main__":
    main()
