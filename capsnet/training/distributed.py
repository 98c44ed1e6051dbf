"""Process-group set-up for ``torchrun`` and the few collectives the training loop needs.

``torchrun --nproc_per_node=N train_mnist.py ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment. Each process trains the same model
on its own shard of every epoch; DistributedDataParallel averages the gradients. NCCL
connects GPU processes, gloo CPU processes. Without those variables everything here is a
no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceError(ValueError):
    """The requested device does not exist here or is not supported (the message says which)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU (``cuda:LOCAL_RANK``) if CUDA is available, else CPU."""
    if device == "auto":
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise DeviceError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from error
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (the devices the routing kernels "
            f"and the float64 metric sums support), got {device!r}"
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE > 1``).

    Every rank binds its own device: ``cuda:LOCAL_RANK`` for GPUs. Returns the context; call
    :func:`cleanup_distributed` at the end.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            dist.init_process_group("nccl", device_id=resolved)
        elif resolved.type == "cpu":
            dist.init_process_group("gloo")
        else:
            raise ValueError(
                f"distributed training supports CPU (gloo) and CUDA (nccl), got device {resolved}"
            )
    elif resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return DistributedContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=resolved
    )


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; no-op for one process."""
    if context.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """True on every rank if ``flag`` is True on any rank (so all ranks stop at one step)."""
    if not context.is_distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
