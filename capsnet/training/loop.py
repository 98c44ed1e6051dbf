"""The hot loops: one training epoch (resumable at any step) and one pass over the test set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from capsnet.data import ImageSet, epoch_order, num_batches, random_shift, shard, shift_generator
from capsnet.losses import capsnet_loss
from capsnet.training.config import TrainConfig
from capsnet.training.distributed import DistributedContext, any_rank
from capsnet.training.interrupt import StopRequest
from capsnet.training.metrics import MetricSums
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


def steps_per_epoch(num_train: int, config: TrainConfig, context: DistributedContext) -> int:
    return num_batches(num_train // context.world_size, config.batch_size)


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=description, dynamic_ncols=True, leave=False, unit="step"
    )


def train_epoch(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_set: ImageSet,
    config: TrainConfig,
    context: DistributedContext,
    position: RunPosition,
    sums: MetricSums,
    stop: StopRequest,
    on_step: Callable[[RunPosition], None] | None = None,
) -> bool:
    """Train from ``position`` to the end of its epoch; False if stopped early.

    The epoch's order and every step's shifts are functions of (seed, epoch, step, rank)
    only, so starting at ``position.batch_in_epoch > 0`` continues exactly where an
    interrupted run stopped. ``position`` and ``sums`` are updated in place after every
    step. ``on_step`` runs after each step (tests use it to request a stop).
    """
    order = shard(
        epoch_order(len(train_set), config.seed, position.epoch), context.rank, context.world_size
    )
    total = num_batches(len(order), config.batch_size)
    bar = _progress_bar(
        total,
        position.batch_in_epoch,
        f"epoch {position.epoch + 1}/{config.epochs}",
        config.progress and context.is_main,
    )
    model.train()
    try:
        while position.batch_in_epoch < total:
            # Every rank must agree to stop at the same step, or DDP's all-reduce would hang.
            if any_rank(stop.requested, context):
                return False
            step = position.batch_in_epoch
            images, labels = train_set.batch(
                order[step * config.batch_size : (step + 1) * config.batch_size]
            )
            generator = shift_generator(
                context.device, config.seed, position.epoch, step, context.rank
            )
            images = random_shift(images, config.max_shift, generator)  # Sec. 5 augmentation
            with autocast(context.device, config.amp):
                output = model(images, labels)  # training mode: decoder masked with the labels
                terms = capsnet_loss(output, images, labels, config.reconstruction_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.step(optimizer)
            scaler.update()
            sums.update(terms, output.predictions, labels)
            position.batch_in_epoch += 1
            position.global_step += 1
            if bar is not None:
                bar.update(1)
                if (
                    position.batch_in_epoch % config.log_every == 0
                    or position.batch_in_epoch == total
                ):
                    running = sums.averages()  # waits for the device: only every log_every steps
                    bar.set_postfix(
                        loss=f"{running['loss']:.4f}", acc=f"{100 * running['accuracy']:.2f}%"
                    )
            if on_step is not None:
                on_step(position)
    finally:
        if bar is not None:
            bar.close()
    return True


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test_set: ImageSet,
    config: TrainConfig,
    context: DistributedContext,
) -> dict[str, float]:
    """Loss terms and accuracy on ``test_set`` (unshifted), averaged over all of it.

    Each rank takes every ``world_size``-th image, so together the ranks cover every test
    image exactly once. Pass the bare model, not the DDP wrapper: evaluation needs no
    gradient synchronisation. The decoder is masked as ``config.eval_mask`` says.
    """
    model.eval()
    indices = torch.arange(context.rank, len(test_set), context.world_size)
    sums = MetricSums(context.device)
    bar = _progress_bar(
        num_batches(len(indices), config.eval_batch_size),
        0,
        "test",
        config.progress and context.is_main,
    )
    for start in range(0, len(indices), config.eval_batch_size):
        images, labels = test_set.batch(indices[start : start + config.eval_batch_size])
        with autocast(context.device, config.amp):
            output = model(images, labels, mask=config.eval_mask)
            terms = capsnet_loss(output, images, labels, config.reconstruction_weight)
        sums.update(terms, output.predictions, labels)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return sums.reduced(context).averages()
