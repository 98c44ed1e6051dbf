"""Batch order, sharding over processes, and the seeds of every random draw of a run.

Everything random in training is a pure function of ``(seed, stream, epoch, step, rank)``
through :func:`derive_seed`, so a run resumed from a checkpoint sees exactly the batches
and augmentations an uninterrupted run would have seen, at any step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Separate random streams: the batch order and the per-step augmentation never share a seed.
ORDER_STREAM = 1
AUGMENTATION_STREAM = 2


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints, e.g. ``(seed, stream, epoch, step)``.

    ``numpy.random.SeedSequence`` hashes the whole tuple, so nearby tuples (step 7 vs 8) give
    unrelated streams, unlike ``seed + step``.
    """
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"seed components must be non-negative ints, got {values}")
    state = np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def epoch_order(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The shuffled sample order of one epoch (a CPU int64 permutation), the same on every rank."""
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, ORDER_STREAM, epoch))
    return torch.randperm(num_samples, generator=generator)


def shard(order: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of ``order``: every ``world_size``-th sample from ``rank`` on.

    The tail is dropped so that every rank gets the same number of samples (as in
    ``DistributedSampler(drop_last=True)``): DistributedDataParallel needs every rank to run
    the same number of steps.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    per_rank = len(order) // world_size
    return order[rank : per_rank * world_size : world_size]


def num_batches(num_samples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be smaller."""
    return -(-num_samples // batch_size)


def step_generator(
    device: torch.device, seed: int, epoch: int, step: int, rank: int = 0
) -> torch.Generator:
    """The generator for the random augmentation of one training step on one rank, on
    ``device`` (the draws happen there: no host sync)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, AUGMENTATION_STREAM, epoch, step, rank))
    return generator
