"""Process-group set-up for ``torchrun`` and the few collectives the training loop needs.

``torchrun --nproc_per_node=N train_mnist.py ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment. Each process trains the same model
on its own shard of every epoch; DistributedDataParallel averages the gradients. NCCL
connects GPU processes, gloo CPU processes. Without those variables everything here is a
no-op for a single process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from capsnet.training.errors import DeviceError


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


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(context: DistributedContext, enabled: bool = True) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. a download), the other ranks after it finished."""
    if enabled and not context.is_main:
        barrier(context)
    try:
        yield
    finally:
        if enabled and context.is_main:
            barrier(context)


@dataclass(frozen=True)
class Vote:
    """What all ranks agreed on at a step: stop (asked for on some rank), or the run
    diverged (a non-finite loss on some rank)."""

    stop: bool = False
    diverged: bool = False

    def __or__(self, other: Vote) -> Vote:
        return Vote(self.stop or other.stop, self.diverged or other.diverged)


class StepVote:
    """Lets every rank agree, without waiting on the device at each step, to stop at the
    same step: when a stop was asked for (Ctrl-C, SIGTERM) or a loss became non-finite on
    any rank.

    The non-finite flag is accumulated on the device (no host sync). Every ``every`` steps
    both flags are combined over ranks (one small all-reduce, asynchronous) and, when
    ``lagged``, read one step later: by then the next step's work is queued, so the device
    never idles while the host waits. All ranks read the same reduced value after the same
    step, so they stop together (DistributedDataParallel would hang otherwise).

    On a CPU with one process reading costs nothing: use ``every=1, lagged=False`` there,
    and a stop happens right after the step it was asked in.
    """

    def __init__(self, context: DistributedContext, every: int, lagged: bool) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.context = context
        self.every = every
        self.lagged = lagged
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=context.device)
        self._pending: tuple[torch.Tensor, object] | None = None

    @classmethod
    def for_context(cls, context: DistributedContext, every: int) -> StepVote:
        if context.device.type == "cpu" and not context.is_distributed:
            return cls(context, every=1, lagged=False)
        return cls(context, every=every, lagged=True)

    def observe(self, loss: torch.Tensor) -> None:
        """Note whether this step's loss is finite (on the device, no wait)."""
        self._nonfinite |= ~torch.isfinite(loss.detach())

    def after_step(self, steps_done: int, stop_requested: bool) -> Vote:
        """Call after every step with the steps done so far in the epoch; returns the vote
        that became known at this step (nothing to do, most of the time)."""
        vote = Vote()
        if self._pending is not None:
            vote = self._read(self._pending)
            self._pending = None
        if steps_done % self.every == 0:
            issued = self._issue(stop_requested)
            if self.lagged:
                self._pending = issued
            else:
                vote = vote | self._read(issued)
        return vote

    def settle(self, stop_requested: bool) -> Vote:
        """A vote now, waiting for it (end of an epoch, before a checkpoint)."""
        vote = Vote()
        if self._pending is not None:
            vote = self._read(self._pending)
            self._pending = None
        return vote | self._read(self._issue(stop_requested))

    def _issue(self, stop_requested: bool) -> tuple[torch.Tensor, object]:
        # torch.full launches a fill: no host-to-device copy, which would wait for the queue.
        stop = torch.full((1,), float(stop_requested), device=self.context.device)
        flags = torch.cat([stop, self._nonfinite.to(stop.dtype).reshape(1)])
        work = None
        if self.context.is_distributed:
            work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
        return flags, work

    @staticmethod
    def _read(issued: tuple[torch.Tensor, object]) -> Vote:
        flags, work = issued
        if work is not None:
            work.wait()
        stop, diverged = flags.tolist()
        return Vote(stop=stop > 0, diverged=diverged > 0)


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """True on every rank if ``flag`` is True on any rank (a collective that waits: use it
    outside the step loop)."""
    if not context.is_distributed:
        return flag
    value = torch.full((1,), 1.0 if flag else 0.0, device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
