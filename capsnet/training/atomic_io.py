"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every file the training program writes (checkpoints, logs, plots, the config), and the
cached data sets (``capsnet/datasets/cache.py``), go through :func:`atomic_write`: write a
temporary file ``.NAME.XXXX.tmp`` in the target's directory, flush and fsync it, then
``os.replace`` it over the target. ``os.replace`` is atomic on POSIX and Windows when both
paths are on one file system, which a sibling temporary file guarantees. A failed write
(full disk, quota, I/O error) removes the temporary file, leaves the target as it was, and
raises :class:`OutputWriteError` naming the file; a process killed mid-write leaves a
temporary file that :func:`remove_temporaries` cleans up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from capsnet.training.errors import OutputWriteError

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file to write ``path``'s new contents; publish it on a clean exit.

    If the ``with`` body raises, the temporary file is removed and ``path`` is untouched.

    Raises:
        OutputWriteError: writing, flushing or publishing failed (e.g. no space left on
            device); the message names ``path`` and the cause.

    Example::

        with atomic_write("metrics.csv", "w") as f:
            f.write(text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OutputWriteError(path, _describe(error)) from error
    recorder = None
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        encoding = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **encoding) as file:
            recorder = _WriteErrorRecorder(file)
            yield recorder
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        # torch.save reports a failed write as a RuntimeError of its own ("unexpected pos");
        # the OSError the file raised underneath says what happened.
        cause = recorder.error if recorder is not None and recorder.error else error
        if isinstance(cause, OSError):
            raise OutputWriteError(path, _describe(cause)) from cause
        raise


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes killed mid-way left in ``directory`` (not in
    its subdirectories' subdirectories); returns what was removed. Call only while no other
    process writes there."""
    directory = Path(directory)
    removed = []
    candidates = list(directory.glob(".*.tmp")) + list(directory.glob("*/.*.tmp"))
    for candidate in candidates:
        if _TEMPORARY.match(candidate.name) and candidate.is_file():
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


class _WriteErrorRecorder:
    """A file object that remembers the OSError a write raised (and raises it on)."""

    def __init__(self, file: IO) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    if error.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return error.strerror or str(error)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
