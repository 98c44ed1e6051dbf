"""Does ``torch.compile`` speed up a CapsNet training step on this machine?

One training step = forward, margin + reconstruction loss, backward, Adam, on the paper's
network with fused routing. The eager and the compiled step are timed alternately in one
process (so both see the same machine load), after warm-up; the compile time is reported
separately. ``train_mnist.py --compile`` uses the compiled step.

    python -m benchmarks.bench_train_step --batch-sizes 32 128 --steps 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from capsnet.losses import capsnet_loss
from capsnet.model import CapsNet


def cpu_description() -> str:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")  # fmt: skip
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    vector = [f for f in flags if f.startswith(("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2"))]
    return f"{model} ({' '.join(sorted(vector))})"


def make_step(model, optimizer, compiled: bool):
    def loss_of(images, labels):
        return capsnet_loss(model(images, labels), images, labels).total

    forward = torch.compile(loss_of, fullgraph=True) if compiled else loss_of

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = forward(images, labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def measure(batch_size: int, steps: int, backend: str) -> dict[str, float]:
    torch.manual_seed(0)
    images = torch.rand(batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (batch_size,))
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = CapsNet(routing_backend=backend).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        runs[compiled] = make_step(model, optimizer, compiled)
    torch._dynamo.reset()
    started = time.perf_counter()
    runs[True](images, labels)  # compiles forward and backward graphs
    compile_seconds = time.perf_counter() - started
    runs[False](images, labels)
    times = {False: [], True: []}
    for _ in range(steps):
        for compiled in (False, True):
            started = time.perf_counter()
            runs[compiled](images, labels)
            times[compiled].append(time.perf_counter() - started)
    eager, compiled = statistics.median(times[False]), statistics.median(times[True])
    return {"eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled,
            "compile_s": compile_seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--routing", default="fused", choices=("fused", "reference"))
    args = parser.parse_args()
    print(f"host: {cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print("| B | eager step s | compiled step s | speed-up | compile s |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        r = measure(batch_size, args.steps, args.routing)
        print(f"| {batch_size} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['compile_s']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
