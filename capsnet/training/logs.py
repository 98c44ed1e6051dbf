"""Where a run's messages and scalars go: Python ``logging`` and TensorBoard.

The library logs to the ``capsnet.training`` logger and installs no handler;
``train_mnist.py`` calls :func:`configure_logging`, which prints rank 0's messages (and
every rank's warnings and errors) as plain lines.

TensorBoard event files are written when the ``tensorboard`` package is installed
(``pip install 'capsnet[tensorboard]'``); without it the run says so once and goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO

import torch

LOGGER_NAME = "capsnet.training"
logger = logging.getLogger(LOGGER_NAME)


class _MessageOnly(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message comes (it may be replaced, e.g.
    by a test's output capture, after logging was configured)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(rank: int = 0, stream: IO | None = None) -> logging.Handler:
    """Print ``capsnet.training`` messages to ``stream`` (default: the current stdout):
    everything on rank 0, warnings and errors only on the other ranks. Calling it again
    replaces the handler it installed."""
    for handler in list(logger.handlers):
        if getattr(handler, "_capsnet", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _StdoutHandler()
    handler._capsnet = True  # type: ignore[attr-defined]
    handler.setFormatter(_MessageOnly())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return handler


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class ScalarWriter:
    """TensorBoard scalars of a run (a no-op object when tensorboard is not installed).

    Args:
        directory: where the event files go.
        purge_step: on resume, the global step the run continues from: events a crashed
            process wrote for later steps are dropped, so no step appears twice.
    """

    def __init__(self, directory: Path, purge_step: int | None = None) -> None:
        self._writer = None
        if not tensorboard_available():
            logger.info(
                "tensorboard is not installed: no event files (pip install tensorboard, or "
                "'capsnet[tensorboard]'); metrics.csv, steps.csv and curves.png have the numbers"
            )
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step or None)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def steps(self, columns: tuple[str, ...], rows: torch.Tensor) -> None:
        """One scalar per column per training step (``rows[:, 0]`` is the global step)."""
        if self._writer is None:
            return
        for row in rows.tolist():
            step = int(row[0])
            for name, value in zip(columns[1:], row[1:], strict=True):
                self._writer.add_scalar(f"train_step/{name}", value, step)

    def epoch(self, record: dict, global_step: int) -> None:
        """An epoch's record (``train_*``, ``test_*``, ``lr``) at its last global step."""
        if self._writer is None:
            return
        for key, value in record.items():
            if key in ("epoch", "global_step") or not isinstance(value, (int, float)):
                continue
            split, _, name = key.partition("_")
            tag = f"{split}/{name}" if split in ("train", "test") else f"epoch/{key}"
            self._writer.add_scalar(tag, value, global_step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
