"""Smoke test of an installed capsnet: the fused op against the reference, values and gradients.

Run from outside the source tree, on an installed copy (a wheel or sdist installed with
``pip install --target DIR``, found through PYTHONPATH) or under CPU emulation:

    PYTHONPATH=DIR python smoke_fused_op.py --expect-under DIR
    PYTHONPATH=DIR qemu-x86_64 -cpu Nehalem .venv/bin/python smoke_fused_op.py --expect-under DIR

Exits non-zero (with the reason) when capsnet is imported from elsewhere than expected, when
the compiled CPU kernel is missing, or when the fused results differ from the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The fused op accumulates in its own order: float64 agrees to ~1e-15, float32 to ~1e-6.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-under", help="fail unless capsnet and capsnet._C are imported from this folder")
    return parser.parse_args()


def check_location(modules, folder):
    for module in modules:
        path = os.path.realpath(module.__file__)
        if not path.startswith(os.path.realpath(folder) + os.sep):
            raise SystemExit(f"smoke: {module.__name__} was imported from {path}, not from under {folder}")


def describe_build(capsnet):
    build_info = getattr(capsnet, "build_info", None)
    return build_info() if callable(build_info) else "capsnet.build_info() unavailable"


def max_difference(fused, reference):
    return max((a - b).abs().max().item() for a, b in zip(fused, reference))


def compare(torch, capsnet, dtype_name):
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    batch, num_in, num_out, dim_out, dim_in, iterations = 3, 7, 5, 6, 4, 3
    u = torch.randn(batch, num_in, dim_in, dtype=dtype, generator=generator)
    W = 0.5 * torch.randn(num_in, num_out, dim_out, dim_in, dtype=dtype, generator=generator)
    bias = 0.1 * torch.randn(num_out, dim_out, dtype=dtype, generator=generator)
    grad_v = torch.randn(batch, num_out, dim_out, dtype=dtype, generator=generator)

    def run(backend):
        inputs = [t.clone().requires_grad_() for t in (u, W, bias)]
        v = capsnet.dynamic_routing(*inputs, iterations, backend=backend)
        v.backward(grad_v)
        return [v.detach()] + [t.grad for t in inputs]

    difference = max_difference(run("fused"), run("reference"))
    ok = difference <= TOLERANCE[dtype_name]
    print(f"smoke: {dtype_name} fused vs reference (v, grad u, grad W, grad bias): max |difference| "
          f"{difference:.3e} (tolerance {TOLERANCE[dtype_name]:.0e}) {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def main():
    args = parse_args()
    start = time.perf_counter()
    import torch

    import capsnet

    print(f"smoke: python {sys.version.split()[0]}, torch {torch.__version__}, capsnet {capsnet.__version__} "
          f"from {os.path.dirname(capsnet.__file__)}", flush=True)
    if args.expect_under:
        check_location([capsnet], args.expect_under)
    if not capsnet.has_kernel("cpu", torch.float32):
        from capsnet import _extension

        raise SystemExit(f"smoke: no fused CPU kernel: {_extension.missing_reason('cpu', torch.float32)}")
    if args.expect_under:
        check_location([sys.modules["capsnet._C"]], args.expect_under)
    print(f"smoke: build: {describe_build(capsnet)}", flush=True)
    results = [compare(torch, capsnet, name) for name in ("float64", "float32")]
    print(f"smoke: {'passed' if all(results) else 'FAILED'} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
