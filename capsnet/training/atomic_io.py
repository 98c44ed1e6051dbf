"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every file the training program writes (checkpoints, the metrics log, plots, the config)
goes through :func:`atomic_write`: write a temporary file in the target's directory, flush
and fsync it, then ``os.replace`` it over the target. ``os.replace`` is atomic on POSIX and
Windows when both paths are on one file system, which a sibling temporary file guarantees.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file to write ``path``'s new contents; publish it on a clean exit.

    If the ``with`` body raises, the temporary file is removed and ``path`` is untouched.

    Example::

        with atomic_write("metrics.csv", "w") as f:
            f.write(text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        with os.fdopen(
            fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})
        ) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
