"""A small fused-op call checked against the reference, for CPUs other than the build's.

Run it under an emulated CPU that lacks the build machine's instructions, e.g. one without
AVX (Debian: apt-get install qemu-user), from outside the source tree:

    qemu-x86_64 -cpu Nehalem .venv/bin/python tests/cpu_portability_smoke.py --expect-kernel baseline
    qemu-x86_64 -cpu Haswell .venv/bin/python tests/cpu_portability_smoke.py --expect-kernel avx2

It exits non-zero on any difference, and an extension that used instructions the CPU lacks
dies with SIGILL (exit status 132 under qemu) instead of printing "ok".
"""

from __future__ import annotations

import argparse

import torch

import capsnet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect-kernel", default=None, help="the CPU kernel variant that must be chosen")
    args = parser.parse_args()
    info = capsnet.build_info()
    print(f"cpu_kernel={info['cpu_kernel']} ({info['cpu_kernel_reason']}); built: {info['cpu_kernels_built']}")
    if args.expect_kernel is not None and info["cpu_kernel"] != args.expect_kernel:
        raise SystemExit(f"expected the {args.expect_kernel} CPU kernel, got {info['cpu_kernel']}")
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    W = (0.1 * torch.randn(40, 10, 16, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    bias = (0.1 * torch.randn(10, 16, generator=gen, dtype=torch.float64)).requires_grad_()
    grad_v = torch.randn(3, 10, 16, generator=gen, dtype=torch.float64)
    results = {}
    for backend in ("fused", "reference"):
        v = capsnet.dynamic_routing(u, W, bias, 3, backend=backend)
        results[backend] = [v, *torch.autograd.grad(v, (u, W, bias), grad_v)]
    error = max((a - b).abs().max().item() for a, b in zip(results["fused"], results["reference"]))
    print(f"max |fused - reference| over v, grad u, grad W, grad bias (float64): {error:.3e}")
    if not error < 1e-10:
        raise SystemExit("the fused op disagrees with the reference")
    print("ok")


if __name__ == "__main__":
    main()
