"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values only, so loading it never
unpickles arbitrary objects. Keys (see :func:`capsnet.training.runner.make_checkpoint`):

    format_version  int           CHECKPOINT_FORMAT; bumped on incompatible changes
    model           state dict    the bare CapsNet's (never DDP's "module."-prefixed one)
    optimizer, scheduler, grad_scaler   state dicts
    train_config    dict          TrainConfig.to_dict(), including the model config
    epoch           int           the epoch in progress (== epochs done when batch_in_epoch is 0)
    batch_in_epoch  int           training steps already done in that epoch
    global_step     int           optimiser steps since the start of the run
    epoch_sums      dict          running sums of the epoch in progress (mid-epoch checkpoints)
    history         list[dict]    one metrics record per finished epoch
    best_test_accuracy  float
    world_size      int           processes that trained it (a mid-epoch resume needs the same)
    rng             dict          global generator states (capsnet.training.rng_state)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from capsnet.model import CapsNet, CapsNetConfig
from capsnet.training.atomic_io import atomic_write

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = (
    "format_version",
    "model",
    "optimizer",
    "scheduler",
    "train_config",
    "epoch",
    "batch_in_epoch",
    "global_step",
    "history",
)


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    with atomic_write(path, "wb") as file:
        torch.save(checkpoint, file)
    return path


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a capsnet training checkpoint."""


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Keep ``map_location="cpu"`` when resuming: the saved RNG states must stay on the CPU
    (``load_state_dict`` moves weights and optimiser state to the model's device anyway).

    Raises:
        CheckpointError: naming the path and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated file, not a torch file, unsafe pickle
        raise CheckpointError(f"could not read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} is not a capsnet checkpoint (got a {type(checkpoint).__name__})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a capsnet training checkpoint: missing keys {missing}"
        )
    if checkpoint["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {checkpoint['format_version']}, this capsnet reads "
            f"format {CHECKPOINT_FORMAT}"
        )
    return checkpoint


def model_from_checkpoint(
    checkpoint: dict[str, Any] | str | os.PathLike, routing_backend: str | None = None
) -> CapsNet:
    """The trained CapsNet in a checkpoint (on the CPU, in eval mode).

    Args:
        checkpoint: a loaded checkpoint or its path.
        routing_backend: override the saved backend (e.g. ``"reference"`` where the compiled
            extension is not built); the weights do not depend on it.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    config = CapsNetConfig.from_dict(checkpoint["train_config"]["model"])
    if routing_backend is not None:
        config = dataclasses.replace(config, routing_backend=routing_backend)
    model = CapsNet(config)
    model.load_state_dict(checkpoint["model"])
    return model.eval()
