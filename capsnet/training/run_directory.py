"""The run directory: what a run writes, in which order, and how a new or resumed run
takes the directory over.

Files (only rank 0 writes; every file is written atomically, see atomic_io.py):

    config.json                    the run's settings (written when training starts)
    best.pt                        the epoch with the highest test accuracy so far
    last.pt                        the latest state: after every epoch, and on Ctrl-C
    metrics.csv                    one row per finished epoch
    steps.csv                      one row per training step (rank 0's batches)
    curves.png                     per-step training curves and per-epoch test points
    reconstructions/epoch_NNN.png  test images and their reconstructions
    tensorboard/                   TensorBoard event files (when tensorboard is installed)

Crash consistency: at the end of an epoch ``best.pt`` (when the epoch improved) is written
*before* ``last.pt``, so a crash between the two leaves a ``best.pt`` newer than ``last.pt``,
never a ``last.pt`` that names a best epoch missing from disk. Resuming repairs the pair:
the newer ``best.pt`` *is* the end-of-epoch state ``last.pt`` should hold, and is copied
over it (:meth:`RunDirectory.reconcile`).

A new run never shares the directory with an earlier run's files: it refuses to start,
or with ``overwrite`` deletes them first and says which.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import IO

from capsnet.training.atomic_io import atomic_write, remove_temporaries
from capsnet.training.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    Checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from capsnet.training.config import TrainConfig
from capsnet.training.errors import CheckpointError, OutputDirError, OutputDirInUseError
from capsnet.training.state import BestEpoch

logger = logging.getLogger("capsnet.training")

CONFIG_FILE = "config.json"
METRICS_LOG = "metrics.csv"
STEPS_LOG = "steps.csv"
CURVES_PLOT = "curves.png"
RECONSTRUCTIONS_DIR = "reconstructions"
TENSORBOARD_DIR = "tensorboard"
_LOCK_FILE = ".lock"
# Everything a run writes; a new run refuses a directory holding any of them.
RUN_FILES = (
    CONFIG_FILE,
    LAST_CHECKPOINT,
    BEST_CHECKPOINT,
    METRICS_LOG,
    STEPS_LOG,
    CURVES_PLOT,
    RECONSTRUCTIONS_DIR,
    TENSORBOARD_DIR,
)

# What a run has written before its first checkpoint.
_BEFORE_FIRST_CHECKPOINT = {CONFIG_FILE, TENSORBOARD_DIR}


class RunDirectory:
    """The output directory of one run (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock: IO | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def last(self) -> Path:
        return self.path / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.path / BEST_CHECKPOINT

    def reconstruction_plot(self, epoch: int) -> Path:
        return self.path / RECONSTRUCTIONS_DIR / f"epoch_{epoch:03d}.png"

    # -- taking the directory over ------------------------------------------------------
    def check_usable(self) -> None:
        """Fail now, before any data is loaded, if the run could not write here.

        Raises:
            OutputDirError: the path is a file, lies under a file, or is not writable.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"--out-dir {path} is a file, not a directory")
        existing = path
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
        if existing != path and not existing.is_dir():
            raise OutputDirError(
                f"--out-dir {path} cannot be created: {existing} is a file, not a directory"
            )
        probe = existing / f".capsnet-write-test-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise OutputDirError(
                f"--out-dir {path} is not writable: cannot create files in {existing} "
                f"({error.strerror or error})"
            ) from None

    def acquire(self) -> None:
        """Create the directory and lock it for this process (one run at a time)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / _LOCK_FILE, "a")  # noqa: SIM115  (held until release)
        except OSError as error:
            raise OutputDirError(f"cannot create --out-dir {self.path}: {error}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise OutputDirInUseError(
                f"{self.path} is in use by another training process (it holds "
                f"{self.path / _LOCK_FILE}); wait for it, or choose another --out-dir"
            ) from None
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def existing_run_files(self) -> list[Path]:
        return [self.path / name for name in RUN_FILES if (self.path / name).exists()]

    def start_new_run(self, overwrite: bool) -> None:
        """Make the (acquired) directory ready for a new run: refuse it if it holds another
        run's files, or delete them first when ``overwrite``. A run that was stopped before
        its first checkpoint left only its config.json and TensorBoard events: nothing to
        resume, they are replaced."""
        self._remove_temporaries()
        existing = self.existing_run_files()
        if not existing:
            return
        if {path.name for path in existing} <= _BEFORE_FIRST_CHECKPOINT:
            logger.info(
                "replacing %s of a run that stopped before its first checkpoint",
                ", ".join(path.name for path in existing),
            )
            _delete(existing)
            return
        if not overwrite:
            raise OutputDirInUseError(
                f"{self.path} already holds a run ({', '.join(p.name for p in existing)}). "
                f"Continue it with --resume {self.last}, choose another --out-dir, or pass "
                "--overwrite to delete its files and start a new run there."
            )
        _delete(existing)
        logger.info(
            "--overwrite: deleted the earlier run's %s from %s",
            ", ".join(p.name for p in existing),
            self.path,
        )

    def start_resumed_run(self, checkpoint: Checkpoint) -> tuple[Checkpoint, BestEpoch | None]:
        """Make the (acquired) directory ready to continue ``checkpoint``.

        Resuming a checkpoint of this directory: temporary files of killed writes are
        removed and best.pt/last.pt repaired (:meth:`reconcile`). Resuming a checkpoint
        from elsewhere into this directory starts a branch of that run here: the directory
        must not hold another run's files.

        Returns:
            The checkpoint to continue (a newer best.pt when last.pt lags behind it), and
            the best epoch as it is on disk when that differs from the checkpoint's record
            (None when they agree).
        """
        if checkpoint.path.resolve().parent != self.path.resolve():
            self.start_new_run(overwrite=False)
            return checkpoint, BestEpoch() if checkpoint.best_epoch is not None else None
        self._remove_temporaries()
        if checkpoint.path == self.best and not self.last.exists():
            logger.warning(
                "%s is missing (the run stopped before writing it): continuing from %s, "
                "the same end-of-epoch state, and copying it to %s",
                self.last, self.best, self.last.name,
            )  # fmt: skip
            _copy_atomically(self.best, self.last)
            checkpoint = Checkpoint(self.last, checkpoint.state, checkpoint.config)
        return self.reconcile(checkpoint)

    def reconcile(self, checkpoint: Checkpoint) -> tuple[Checkpoint, BestEpoch | None]:
        """Repair best.pt/last.pt after a crash, for resuming ``checkpoint`` (in this
        directory); see :meth:`start_resumed_run` for what it returns."""
        best = self._read_best()
        if checkpoint.path.name != LAST_CHECKPOINT:
            # An explicit --resume best.pt (or another file): the user chose the state.
            return checkpoint, None
        if best is not None and _continues(best, checkpoint):
            logger.warning(
                "%s (epoch %d) is newer than %s (epoch %d): the run stopped between writing "
                "the two; continuing from %s and copying it to %s",
                best.path, best.epoch, checkpoint.path, checkpoint.epoch, best.path.name,
                checkpoint.path.name,
            )  # fmt: skip
            _copy_atomically(best.path, checkpoint.path)
            return Checkpoint(checkpoint.path, best.state, best.config), None
        wanted = checkpoint.best_epoch
        if wanted is None:
            return checkpoint, None
        if best is not None and best.at_epoch_end and best.epoch == wanted:
            return checkpoint, None
        if checkpoint.at_epoch_end and checkpoint.epoch == wanted:
            logger.warning(
                "%s was missing or stale; restored it from %s (epoch %d, the best epoch)",
                self.best, checkpoint.path, wanted,
            )  # fmt: skip
            _copy_atomically(checkpoint.path, self.best)
            return checkpoint, None
        on_disk = BestEpoch()
        if best is not None and best.at_epoch_end and best.epoch < checkpoint.epoch:
            record = best.state["history"][-1]
            on_disk = BestEpoch(best.epoch, float(record["test_accuracy"]))
        logger.warning(
            "%s records epoch %d as the best, but %s does not hold it (lost in a crash); "
            "best.pt keeps %s and is replaced by the next epoch that beats it",
            checkpoint.path, wanted, self.best,
            f"epoch {on_disk.epoch}" if on_disk.epoch else "nothing",
        )  # fmt: skip
        return checkpoint, on_disk

    # -- writing ------------------------------------------------------------------------
    def write_config(self, config: TrainConfig) -> None:
        with atomic_write(self.path / CONFIG_FILE, "w") as file:
            json.dump(config.to_dict(), file, indent=2)
            file.write("\n")

    def save_epoch_end(self, state: dict, improved: bool) -> None:
        """The end-of-epoch checkpoints: best.pt first (if the epoch improved), then last.pt."""
        if improved:
            save_checkpoint(state, self.best)
        save_checkpoint(state, self.last)

    def save_interrupted(self, state: dict) -> Path:
        return save_checkpoint(state, self.last)

    # -- helpers --------------------------------------------------------------------------
    def _remove_temporaries(self) -> None:
        removed = remove_temporaries(self.path)
        if removed:
            logger.info(
                "removed %d temporary file(s) left by an interrupted write: %s",
                len(removed), ", ".join(p.name for p in removed),
            )  # fmt: skip

    def _read_best(self) -> Checkpoint | None:
        if not self.best.exists():
            return None
        try:
            return read_checkpoint(self.best)
        except CheckpointError as error:
            logger.warning("ignoring %s: %s", self.best, error)
            return None


def read_resume_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint ``--resume path`` continues. When ``path`` is a run's last.pt that a
    crash kept from being written, its best.pt is the state it would hold (best.pt is written
    first at the end of an epoch): that is read instead (and copied by :meth:`RunDirectory.
    start_resumed_run`)."""
    path = Path(path)
    best = path.with_name(BEST_CHECKPOINT)
    if path.name == LAST_CHECKPOINT and not path.exists() and best.is_file():
        return read_checkpoint(best)
    return read_checkpoint(path)


def _continues(newer: Checkpoint, older: Checkpoint) -> bool:
    """``newer`` is an end-of-epoch state of the same run, later than ``older``."""
    if not newer.at_epoch_end or newer.global_step <= older.global_step:
        return False
    if newer.config.trajectory_differences(older.config):
        return False
    finished = older.state["history"]
    return [_without_timing(r) for r in newer.state["history"][: len(finished)]] == [
        _without_timing(r) for r in finished
    ]


def _without_timing(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "epoch_seconds"}


def _delete(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _copy_atomically(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, atomic_write(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, length=1 << 20)


@contextlib.contextmanager
def acquired(directory: RunDirectory):
    directory.acquire()
    try:
        yield directory
    finally:
        directory.release()
