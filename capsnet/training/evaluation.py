"""Evaluating a network on a test split, during a run and from a saved checkpoint."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from capsnet.datasets import ExampleSet, get_dataset, num_batches
from capsnet.training.checkpoint import Checkpoint, model_from_checkpoint, read_checkpoint
from capsnet.training.config import TrainConfig
from capsnet.training.data import load_split
from capsnet.training.distributed import (
    DistributedContext,
    cleanup_distributed,
    setup_distributed,
)
from capsnet.training.errors import ConfigError
from capsnet.training.loop import progress_bar
from capsnet.training.metrics import MetricSums
from capsnet.training.models import build_objective, check_routing_backend
from capsnet.training.precision import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective,
    test_set: ExampleSet,
    context: DistributedContext,
    *,
    batch_size: int,
    mask: str,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """The objective's loss terms and the accuracy on ``test_set`` (never augmented),
    averaged over all of it (for several digits per image, the accuracy counts an image
    as correct when all its digits are; see the objective).

    Each rank takes every ``world_size``-th example, so together the ranks cover every test
    example exactly once (the sums are reduced over ranks: call on every rank). Pass the
    bare model, not the DDP wrapper: evaluation needs no gradient synchronisation.
    """
    model.eval()
    indices = torch.arange(context.rank, len(test_set), context.world_size)
    sums = MetricSums(objective.term_names, context.device)
    bar = progress_bar(
        num_batches(len(indices), batch_size), 0, "test", progress and context.is_main
    )
    for start in range(0, len(indices), batch_size):
        images, targets = test_set.batch(indices[start : start + batch_size])
        with autocast(context.device, amp):
            result = objective(model, images, targets, mask=mask)
        sums.update(result.terms, result.correct, images.shape[0])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return sums.reduced(context).averages()


def evaluate_saved_run(
    checkpoint: Checkpoint, config: TrainConfig, eval_set: str = "test"
) -> dict[str, float]:
    """The metrics of ``checkpoint``'s network on its data set's split ``eval_set``
    ("test", or another evaluation set such as expanded-mnist's "affine"), with ``config``
    (the checkpoint's settings with any evaluation options changed) deciding data, device
    and batch size.

    Raises:
        ConfigError: a changed network or data set, or an ``eval_set`` the data set lacks
            (field ``eval_set``).
    """
    spec = get_dataset(config.dataset)
    if eval_set not in spec.evaluation_splits:
        raise ConfigError(
            "eval_set",
            f"must be one of {', '.join(spec.evaluation_splits)} for {spec.name}, got "
            f"{eval_set!r}",
        )
    for name in config.trajectory_differences(checkpoint.config):
        if name.startswith("model.") or name in ("dataset", "architecture"):
            raise ConfigError(
                name,
                f"cannot change when evaluating {checkpoint.path}: the network and its data "
                f"are the checkpoint's ({checkpoint.config.lookup(name)!r})",
            )
    context = setup_distributed(config.device)
    try:
        if context.is_distributed:
            raise ConfigError("device", "evaluate a checkpoint with one process (not torchrun)")
        check_routing_backend(config, context.device)
        test_set = load_split(config, eval_set, context)
        model = model_from_checkpoint(checkpoint, routing_backend=config.routing).to(
            context.device
        )
        return evaluate(
            model,
            build_objective(config),
            test_set,
            context,
            batch_size=config.eval_batch_size,
            mask=config.eval_mask,
            amp=config.amp,
            progress=config.progress,
        )
    finally:
        cleanup_distributed()


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    routing_backend: str | None = None,
    eval_mask: str = "predicted",
    limit_test: int | None = None,
    eval_batch_size: int = 256,
    amp: bool = False,
    download: bool = False,
    progress: bool = True,
    eval_set: str = "test",
    test_copies: int | None = None,
) -> dict[str, float]:
    """Loss terms and accuracy of the network in checkpoint ``path`` on its data set's
    split ``eval_set`` (one process); ``test_copies`` sizes a synthetic evaluation set.

    ``routing_backend`` overrides the one the run trained with (e.g. ``"reference"``
    without the compiled extension).

    Raises:
        CheckpointError, ConfigError, DatasetError: naming the file or the setting.
    """
    checkpoint = read_checkpoint(path)
    changes: dict[str, Any] = dict(
        data_dir=data_dir,
        device=device,
        eval_mask=eval_mask,
        limit_test=limit_test,
        eval_batch_size=eval_batch_size,
        amp=amp,
        download=download,
        progress=progress,
        test_copies=test_copies,
    )
    if routing_backend is not None:
        changes["routing"] = routing_backend
    return evaluate_saved_run(checkpoint, checkpoint.config.replace(**changes), eval_set)
