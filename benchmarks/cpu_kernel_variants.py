"""Every CPU kernel variant side by side, against the reference, torch.compile(reference)
and, optionally, another checkout (an older build): the table of issue 8.

    python -m benchmarks.cpu_kernel_variants                       # B in {1, 32, 128}, 2 threads
    python -m benchmarks.cpu_kernel_variants --old-checkout ../baseline --rounds 5
    python -m benchmarks.cpu_kernel_variants --threads 1 --clock cpu   # on a busy machine
    python -m benchmarks.cpu_kernel_variants --isa-limit avx2          # as on an AVX2-only CPU

The kernel variant is chosen once per process (CAPSNET_CPU_KERNEL), so every measurement
runs in a fresh worker process; the workers of all configurations are interleaved, round
after round, and each figure is the median over the rounds, so that a busy machine
disturbs all configurations alike. Times (--clock wall): median of torch.utils.benchmark
blocked runs; (--clock cpu) the least process CPU time of repeated runs, which a machine
shared with other work inflates far less than wall time (use it with --threads 1, where
CPU time is the time the work takes),
"fwd" under no_grad, "fwd+bwd" a forward and a backward of u, W and bias; CapsNet shape
(N_in=1152, N_out=10, D_out=16, D_in=8, r=3), float32, with bias. The FLOP floor of the
forward is its 2 B N_in N_out D_out (D_in + 2r - 1) FLOPs at the rate torch.mm reaches on
a [4096 x 4096] x [4096 x 4096] float32 product in the same run, with the same threads.

--isa-limit avx2 measures as an AVX2-only CPU (no AVX-512) would run it, on a CPU that has
more: every worker runs with ATEN_CPU_CAPABILITY=avx2 (ATen's kernels and the C++ that
torch.compile generates), MKL_ENABLE_INSTRUCTIONS=AVX2 (torch.mm) and DNNL_MAX_CPU_ISA=AVX2,
and only the fused variants up to avx2 are run. What it cannot reproduce: another
machine's caches, memory bandwidth and clocks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPE = dict(num_in=1152, num_out=10, dim_out=16, dim_in=8)
ITERATIONS = 3
MM_SIZE = 4096
# The environment that keeps torch, MKL and oneDNN to an instruction set, and the fused
# variants allowed with it.
ISA_LIMITS = {
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"},
             ("baseline", "avx2")),
    "baseline": ({"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41"},
                 ("baseline",)),
}


def forward_flops(batch: int) -> float:
    s = SHAPE
    return 2.0 * batch * s["num_in"] * s["num_out"] * s["dim_out"] * (s["dim_in"] + 2 * ITERATIONS - 1)


# ---------------------------------------------------------------------------------------
# Worker: one configuration, all batch sizes, JSON on stdout.
# ---------------------------------------------------------------------------------------
def _worker(kind: str, batch_sizes: list[int], threads: int, min_run_time: float, clock: str) -> dict:
    import time

    import torch
    import torch.utils.benchmark as benchmark

    torch.set_num_threads(threads)

    def median_ms(step):
        for _ in range(2):
            step()
        if clock == "cpu":
            spent, least = 0.0, float("inf")
            while spent < min_run_time:
                start = time.process_time()
                step()
                elapsed = time.process_time() - start
                spent, least = spent + elapsed, min(least, elapsed)
            return least * 1e3
        timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3

    if kind == "mm":
        a, b = torch.randn(MM_SIZE, MM_SIZE), torch.randn(MM_SIZE, MM_SIZE)
        return {"gflops": 2 * MM_SIZE**3 / median_ms(lambda: a @ b) / 1e6}

    import capsnet

    if kind == "reference":
        fn = lambda u, W, b: capsnet.dynamic_routing_reference(u, W, b, ITERATIONS)  # noqa: E731
    elif kind == "compiled":
        fn = torch.compile(lambda u, W, b: capsnet.dynamic_routing_reference(u, W, b, ITERATIONS))
    else:  # fused, of this checkout or another
        fn = lambda u, W, b: capsnet.dynamic_routing(u, W, b, ITERATIONS, backend="fused")  # noqa: E731
    result = {"times": {}}
    if hasattr(capsnet, "build_info"):
        result["kernel"] = capsnet.build_info()["cpu_kernel"]
    for batch in batch_sizes:
        gen = torch.Generator().manual_seed(0)
        s = SHAPE
        u = torch.randn(batch, s["num_in"], s["dim_in"], generator=gen).requires_grad_()
        W = (0.05 * torch.randn(s["num_in"], s["num_out"], s["dim_out"], s["dim_in"], generator=gen)).requires_grad_()
        bias = (0.1 * torch.randn(s["num_out"], s["dim_out"], generator=gen)).requires_grad_()
        grad_v = torch.randn(batch, s["num_out"], s["dim_out"], generator=gen)

        def forward():
            with torch.no_grad():
                fn(u, W, bias)

        def forward_backward():
            torch.autograd.grad(fn(u, W, bias), (u, W, bias), grad_v)

        result["times"][str(batch)] = {"fwd": median_ms(forward), "fwdbwd": median_ms(forward_backward)}
    return result


# ---------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------
def _run_worker(kind, args, env_update=None, pythonpath=None) -> dict:
    env = dict(os.environ)
    env.pop("CAPSNET_CPU_KERNEL", None)
    env.update(env_update or {})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--threads", str(args.threads),
               "--min-run-time", str(args.min_run_time), "--clock", args.clock,
               "--batch-sizes", *map(str, args.batch_sizes)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _host() -> str:
    import capsnet

    info = capsnet.build_info()
    return (f"{info['cpu_model']}, flags {' '.join(info['cpu_flags'])}; torch {info['torch']}; "
            f"CPU kernels built: {', '.join(info['cpu_kernels_built'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--variants", nargs="+", default=None, help="CPU kernel variants (default: all supported)")
    parser.add_argument("--old-checkout", default=None, help="another checkout with its extension built")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--isa-limit", choices=sorted(ISA_LIMITS), default=None,
                        help="run everything as on a CPU with at most this instruction set")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.batch_sizes, args.threads, args.min_run_time, args.clock)))
        return

    import capsnet

    variants = args.variants or capsnet.build_info()["cpu_kernels_supported"]
    if args.isa_limit:
        limit_env, allowed = ISA_LIMITS[args.isa_limit]
        os.environ.update(limit_env)  # inherited by every worker
        variants = [v for v in variants if v in allowed]
    configs = [("reference", "reference", {}, None)]
    if not args.no_compile:
        configs.append(("compiled", "torch.compile(reference)", {}, None))
    configs += [("fused", f"fused {v}", {"CAPSNET_CPU_KERNEL": v}, None) for v in variants]
    if args.old_checkout:
        configs.append(("fused", "fused, old checkout", {}, os.path.abspath(args.old_checkout)))
    samples = {label: [] for _, label, _, _ in configs}
    mm = []
    for round_index in range(args.rounds):
        mm.append(_run_worker("mm", args)["gflops"])
        for kind, label, env, path in configs:
            samples[label].append(_run_worker(kind, args, env, path))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    mm_rate = statistics.median(mm)

    def median(label, batch, what):
        return statistics.median(r["times"][str(batch)][what] for r in samples[label])

    limited = f" Limited to {args.isa_limit}: {ISA_LIMITS[args.isa_limit][0]}." if args.isa_limit else ""
    print(f"Host: {_host()}.{limited} {args.threads} threads, {args.clock} clock, {args.rounds} rounds (medians); "
          f"torch.mm {mm_rate:.0f} GFLOP/s. CapsNet shape, float32, with bias; times in ms.\n")
    print("| B | variant | fwd ms | fwd+bwd ms | fwd vs eager | fwd+bwd vs eager | fwd+bwd vs compile | fwd / FLOP floor |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        floor_ms = forward_flops(batch) / mm_rate / 1e6
        eager, eager_fwd = median("reference", batch, "fwdbwd"), median("reference", batch, "fwd")
        compiled = None if args.no_compile else median("torch.compile(reference)", batch, "fwdbwd")
        for _, label, _, _ in configs:
            fwd, both = median(label, batch, "fwd"), median(label, batch, "fwdbwd")
            vs_compile = f"{compiled / both:.1f}x" if compiled else "-"
            print(f"| {batch} | {label} | {fwd:.2f} | {both:.2f} | {eager_fwd / fwd:.1f}x | {eager / both:.1f}x | {vs_compile} | "
                  f"{fwd / floor_ms:.2f} |")
    print(f"\nFLOP floor of the forward: {forward_flops(128) / 1e9:.2f} GFLOP at B=128. "
          "'vs' columns: the reference's (or compiled reference's) time divided by this row's.")


if __name__ == "__main__":
    main()
