"""Generated data sets kept on disk between runs, verified on every read.

A generated evaluation set (the affNIST-like set) is a pure function of its source digits
and its parameters, but rebuilding it costs seconds per 10,000 images, and its pixels can
differ in rare places between CPUs (ATen's resampling kernels round differently per
instruction set). Caching it makes a set, once built, the same images for every later
evaluation on that machine, and a file that can be copied to another one.

Where: ``$CAPSNET_CACHE_DIR`` if set (``none`` turns caching off), else
``$XDG_CACHE_HOME/capsnet``, else ``~/.cache/capsnet``. One file per set and key:
``<name>-<16 hex digits of the key's hash>.pt``, holding the key itself, the tensor and the
SHA-256 of its bytes. A file is used only if its key equals the one asked for and its
contents hash to the digest stored with them; anything else (a truncated or damaged file,
another key, an unreadable file) is reported by a warning naming the file and the reason,
and the set is rebuilt and the file rewritten. Files are written to a temporary name in
the same directory and renamed into place, so a killed process or a full disk never leaves
a partial file under the real name; a cache that cannot be written (read-only, disk full)
costs a warning and the rebuild, never the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

CACHE_DIR_ENV = "CAPSNET_CACHE_DIR"
CACHE_OFF = "none"
FILE_FORMAT = 1


def cache_dir() -> Path | None:
    """The cache directory, or None when caching is turned off (``CAPSNET_CACHE_DIR=none``)."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen is not None and chosen != "":
        return None if chosen.lower() == CACHE_OFF else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "capsnet"


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes (contiguous, on the CPU), in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())  # hashed in place, not copied
    return digest.hexdigest()


def cache_path(name: str, key: dict) -> Path | None:
    """The file of set ``name`` under ``key`` (JSON-serialisable), or None when caching is off."""
    directory = cache_dir()
    if directory is None:
        return None
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"{name}-{key_hash}.pt"


def _read(path: Path, key: dict) -> Tensor | None:
    """The cached tensor at ``path`` if it is whole and made for ``key``; else None, with a
    warning when the file exists but cannot be used."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(stored, dict) or stored.get("format") != FILE_FORMAT:
            reason = f"not a capsnet cache file of format {FILE_FORMAT}"
        elif stored.get("key") != key:
            reason = "it was made for other parameters or source data"
        elif tensor_digest(stored["tensor"]) != stored.get("sha256"):
            reason = "its contents do not match their SHA-256 (damaged)"
        else:
            return stored["tensor"]
    except Exception as error:  # a truncated or foreign file: any unpickling error
        reason = f"it cannot be read ({type(error).__name__}: {error})"
    warnings.warn(f"capsnet: not using the cached data set {path}: {reason}; rebuilding it", stacklevel=3)
    return None


def _write(path: Path, key: dict, tensor: Tensor) -> None:
    """Write atomically (the training program's atomic_write); a failure is a warning."""
    # Imported here: capsnet.training imports this package, so a module-level import would
    # be circular. By the time a set is cached, both packages are loaded.
    from capsnet.training.atomic_io import atomic_write

    try:
        with atomic_write(path, "wb") as file:
            torch.save({"format": FILE_FORMAT, "key": key, "sha256": tensor_digest(tensor), "tensor": tensor}, file)
    except OSError as error:  # OutputWriteError, raised from the OSError that says why
        warnings.warn(f"capsnet: could not cache the data set at {path}: {error.__cause__ or error}", stacklevel=3)


def cached_tensor(name: str, key: dict, build: Callable[[], Tensor]) -> Tensor:
    """The tensor of set ``name`` under ``key``: read from the cache when a valid file is
    there, else ``build()``, stored (when caching is on) and returned."""
    path = cache_path(name, key)
    if path is not None:
        cached = _read(path, key)
        if cached is not None:
            return cached
    tensor = build().cpu().contiguous()
    if path is not None:
        _write(path, key, tensor)
    return tensor


__all__ = ["CACHE_DIR_ENV", "CACHE_OFF", "cache_dir", "cache_path", "cached_tensor", "tensor_digest"]
