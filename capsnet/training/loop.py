"""The hot loop: one training epoch, resumable at any step, with no per-step host sync."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from capsnet.datasets import ExampleSet, epoch_order, num_batches, shard, step_generator
from capsnet.training.distributed import DistributedContext, StepVote, Vote
from capsnet.training.interrupt import StopRequest
from capsnet.training.metrics import MetricSums, StepLog
from capsnet.training.precision import autocast


@dataclass
class RunPosition:
    """Where a run stands; saved in every checkpoint.

    Attributes:
        epoch: the epoch in progress (0-based); equals the number of finished epochs when
            ``batch_in_epoch`` is 0.
        batch_in_epoch: training steps already done in ``epoch``.
        global_step: optimiser steps since the run began.
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0


@dataclass
class EpochSettings:
    """What one epoch of training needs to know besides the model and the data."""

    seed: int
    batch_size: int
    epochs: int
    amp: bool
    progress: bool
    log_every: int


def steps_per_epoch(num_train: int, batch_size: int, context: DistributedContext) -> int:
    return num_batches(num_train // context.world_size, batch_size)


def progress_bar(total: int, initial: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=description, dynamic_ncols=True, leave=False, unit="step"
    )


def train_epoch(
    *,
    step_loss: Callable,
    parameters_owner: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_set: ExampleSet,
    settings: EpochSettings,
    context: DistributedContext,
    position: RunPosition,
    sums: MetricSums,
    step_log: StepLog,
    vote: StepVote,
    stop: StopRequest,
    on_step: Callable[[RunPosition], None] | None = None,
) -> Vote:
    """Train from ``position`` to the end of its epoch, or until the ranks vote to stop.

    Args:
        step_loss: ``step_loss(images, targets)`` -> :class:`~capsnet.training.objective.StepLoss`
            (the objective bound to the training model, possibly compiled).
        parameters_owner: the module whose ``train()`` mode is set (the DDP wrapper or model).

    The epoch's order and every step's augmentation are functions of (seed, epoch, step,
    rank) only, so starting at ``position.batch_in_epoch > 0`` continues exactly where an
    interrupted run stopped. ``position``, ``sums`` and ``step_log`` are updated in place
    after every step. ``on_step`` runs after each step (tests use it to request a stop).

    Returns:
        The vote that ended the epoch early (``stop`` or ``diverged``), or an empty vote
        when the epoch finished.
    """
    order = shard(
        epoch_order(len(train_set), settings.seed, position.epoch), context.rank, context.world_size
    )
    total = num_batches(len(order), settings.batch_size)
    bar = progress_bar(
        total,
        position.batch_in_epoch,
        f"epoch {position.epoch + 1}/{settings.epochs}",
        settings.progress and context.is_main,
    )
    parameters_owner.train()
    try:
        while position.batch_in_epoch < total:
            step = position.batch_in_epoch
            indices = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            generator = step_generator(
                context.device, settings.seed, position.epoch, step, context.rank
            )
            images, targets = train_set.batch(indices, generator)
            with autocast(context.device, settings.amp):
                result = step_loss(images, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(result.total).backward()
            scaler.step(optimizer)
            scaler.update()
            vote.observe(result.total)
            position.batch_in_epoch += 1
            position.global_step += 1
            sums.update(result.terms, result.correct, images.shape[0])
            step_log.record(position.global_step, result.terms, result.correct, images.shape[0])
            if bar is not None:
                bar.update(1)
                if position.batch_in_epoch % settings.log_every == 0:
                    running = sums.averages()  # waits for the device: only every log_every steps
                    bar.set_postfix(
                        loss=f"{running['loss']:.4f}", acc=f"{100 * running['accuracy']:.2f}%"
                    )
            if on_step is not None:
                on_step(position)
            decision = vote.after_step(position.batch_in_epoch, stop.requested)
            if decision.diverged or (decision.stop and position.batch_in_epoch < total):
                return decision
    finally:
        if bar is not None:
            bar.close()
    return Vote()
