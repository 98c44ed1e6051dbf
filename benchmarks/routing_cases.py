"""What the benchmarks run: shapes, inputs, the three variants, timed steps and FLOP counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capsnet import dynamic_routing, dynamic_routing_reference

VARIANTS = ("fused", "reference", "compiled")
DIRECTIONS = ("forward", "forward+backward")


@dataclass(frozen=True)
class RoutingShape:
    """Capsule counts and sizes of one routing layer (the batch size is chosen per run)."""

    name: str
    num_in: int
    num_out: int
    dim_out: int
    dim_in: int

    def describe(self) -> str:
        return f"N_in={self.num_in}, N_out={self.num_out}, D_out={self.dim_out}, D_in={self.dim_in}"


# CapsNet on MNIST (Sabour et al., 2017): 1152 primary capsules of 8-D to 10 digit capsules of 16-D.
CAPSNET = RoutingShape("CapsNet", num_in=1152, num_out=10, dim_out=16, dim_in=8)
# The large case users reported running out of memory with (issue 9): 3872 primary capsules
# to 196 classes; the eager reference keeps a [B, 3872, 196, 16] prediction tensor.
LARGE = RoutingShape("large", num_in=3872, num_out=196, dim_out=16, dim_in=8)


def make_inputs(shape: RoutingShape, batch: int, device: str, dtype: torch.dtype, seed: int = 0):
    """u, W, bias, grad_v for one run: the same values on every machine for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, shape.num_in, shape.dim_in, generator=generator, dtype=dtype)
    W = 0.05 * torch.randn(shape.num_in, shape.num_out, shape.dim_out, shape.dim_in, generator=generator, dtype=dtype)
    bias = 0.1 * torch.randn(shape.num_out, shape.dim_out, generator=generator, dtype=dtype)
    grad_v = torch.randn(batch, shape.num_out, shape.dim_out, generator=generator, dtype=dtype)
    return [t.to(device) for t in (u, W, bias, grad_v)]


def routing_function(variant: str, iterations: int):
    """The routing of one variant as f(u, W, bias) -> v."""
    if variant == "reference":
        return lambda u, W, bias: dynamic_routing_reference(u, W, bias, iterations)
    if variant == "compiled":
        return torch.compile(lambda u, W, bias: dynamic_routing_reference(u, W, bias, iterations))
    if variant == "fused":
        return lambda u, W, bias: dynamic_routing(u, W, bias, iterations, backend="fused")
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def synchronize_after(step, device: str):
    """CUDA runs asynchronously: a timed step ends only when the GPU has finished it."""
    if torch.device(device).type != "cuda":
        return step

    def synchronized():
        step()
        torch.cuda.synchronize()

    return synchronized


def forward_step(fn, u, W, bias):
    """One forward under no_grad (inference)."""

    def step():
        with torch.no_grad():
            fn(u, W, bias)

    return synchronize_after(step, u.device)


def forward_backward_step(fn, u, W, bias, grad_v):
    """One forward and one backward into u, W and bias (a training step's routing)."""

    def step():
        for t in (u, W, bias):
            t.grad = None
        fn(u, W, bias).backward(grad_v)

    return synchronize_after(step, u.device)


def make_step(direction: str, fn, u, W, bias, grad_v):
    if direction == "forward":
        return forward_step(fn, u, W, bias)
    if direction == "forward+backward":
        return forward_backward_step(fn, u, W, bias, grad_v)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def forward_flops(shape: RoutingShape, batch: int, iterations: int) -> int:
    """Multiply-adds (x2) that any forward must do: the predictions u_hat (D_in per output
    component), the weighted sum of every iteration and the agreement of all but the last.
    Softmax, squash and bias are left out: this is a lower bound (0.61 GFLOP at B=128, CapsNet)."""
    per_component = shape.dim_in + iterations + (iterations - 1)
    return 2 * batch * shape.num_in * shape.num_out * shape.dim_out * per_component
