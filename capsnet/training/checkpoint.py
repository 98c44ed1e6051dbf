"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

The contents (the schema) are :class:`capsnet.training.state.TrainingState`'s business;
this module reads and writes the files and turns every way a file can be unusable into a
:class:`CheckpointError` that names it.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsnet.training.atomic_io import atomic_write
from capsnet.training.config import TrainConfig
from capsnet.training.errors import CheckpointError
from capsnet.training.models import build_model
from capsnet.training.state import check_weights, parse_checkpoint

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


@dataclass
class Checkpoint:
    """A checkpoint read from ``path``: its state (current format) and its settings."""

    path: Path
    state: dict[str, Any]
    config: TrainConfig

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    @property
    def batch_in_epoch(self) -> int:
        return self.state["batch_in_epoch"]

    @property
    def global_step(self) -> int:
        return self.state["global_step"]

    @property
    def at_epoch_end(self) -> bool:
        return self.state["batch_in_epoch"] == 0

    @property
    def best_epoch(self) -> int | None:
        return self.state["best_epoch"]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Raises:
        OutputWriteError: naming ``path`` (e.g. no space left on device); the previous
            file is intact.
    """
    path = Path(path)
    with atomic_write(path, "wb") as file:
        torch.save(state, file)
    return path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check the checkpoint at ``path`` (on the CPU: the RNG states must stay there;
    ``load_state_dict`` moves weights and optimiser state to the model's device).

    Raises:
        CheckpointError: naming ``path`` and what is wrong with it.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): a copy or a write that did not finish"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(_unpickling_problem(path, error)) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a torch.save file (truncated?): "
            f"{_shorten(reason)}"
        ) from None
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a torch.save file (truncated?): "
            f"{error.strerror or error}"
        ) from None
    state, config = parse_checkpoint(raw, str(path))
    return Checkpoint(path, state, config)


def model_from_checkpoint(
    checkpoint: Checkpoint | str | os.PathLike, routing_backend: str | None = None
) -> torch.nn.Module:
    """The trained network in a checkpoint (on the CPU, in eval mode).

    Args:
        checkpoint: a :class:`Checkpoint` or its path.
        routing_backend: the routing backend to run it with (default: the one the run
            trained with); the weights do not depend on it. Networks that do not route
            (the baseline CNN) ignore it.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    model = build_model(checkpoint.config)
    check_weights(checkpoint.state["model"], model, str(checkpoint.path))
    model.load_state_dict(checkpoint.state["model"])
    if routing_backend is not None and hasattr(model, "routing_backend"):
        model.routing_backend = routing_backend
    return model.eval()


def _unpickling_problem(path: Path, error: pickle.UnpicklingError) -> str:
    with open(path, "rb") as file:
        start = file.read(4)
    # torch.save writes a zip archive (PK..); older torch, a pickle (protocol byte 0x80).
    if not (start.startswith(b"PK") or start.startswith(b"\x80")):
        return f"checkpoint {path} is not a file written by torch.save (it starts with {start!r})"
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "global" in line]
    detail = f": {_shorten(lines[0])}" if lines else ""
    return (
        f"checkpoint {path} holds Python objects that safe loading (weights_only) refuses; "
        f"not a capsnet checkpoint, or an unsafe pickle{detail}"
    )


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
