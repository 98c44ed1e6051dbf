"""Reading IDX files (the format of the MNIST distribution) with checks that name the file.

An IDX file is a 4-byte magic number ``00 00 TT NN`` (TT: element type, 0x08 for unsigned
bytes; NN: number of dimensions), NN big-endian 32-bit sizes, then the elements in C order.
Every way a file can be damaged (empty, truncated, wrong type, wrong rank or size, extra
bytes) is reported as :class:`IdxFormatError` naming the file and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

UNSIGNED_BYTE = 0x08
_HEADER_START = 4
_DIM_BYTES = 4


class IdxFormatError(ValueError):
    """A file is not the IDX file it should be (the message names the file and the problem)."""


def read_idx_uint8(path: str | os.PathLike, num_dims: int) -> torch.Tensor:
    """The uint8 array in IDX file ``path``, which must have ``num_dims`` dimensions.

    Returns a CPU uint8 tensor of the shape the header gives.

    Raises:
        IdxFormatError: the file is empty, truncated, longer than its header says, or its
            header is not that of a ``num_dims``-dimensional unsigned-byte array.
    """
    path = Path(path)
    data = path.read_bytes()
    header_size = _HEADER_START + _DIM_BYTES * num_dims
    expected_magic = f"0x{(UNSIGNED_BYTE << 8) | num_dims:08x}"
    if len(data) == 0:
        raise IdxFormatError(f"{path} is empty (0 bytes); expected an IDX file")
    if len(data) < header_size:
        raise IdxFormatError(
            f"{path} is truncated: {len(data)} bytes, shorter than the {header_size}-byte "
            f"header of a {num_dims}-dimensional IDX file"
        )
    magic = int.from_bytes(data[:_HEADER_START], "big")
    if data[0] != 0 or data[1] != 0 or data[2] != UNSIGNED_BYTE or data[3] != num_dims:
        raise IdxFormatError(
            f"{path} has magic number 0x{magic:08x}, expected {expected_magic} (IDX, unsigned "
            f"bytes, {num_dims} dimension{'s' if num_dims > 1 else ''}): not this IDX file, "
            "or a compressed (.gz) one"
        )
    shape = tuple(
        int.from_bytes(data[start : start + _DIM_BYTES], "big")
        for start in range(_HEADER_START, header_size, _DIM_BYTES)
    )
    count = 1
    for size in shape:
        count *= size
    body = len(data) - header_size
    if body < count:
        raise IdxFormatError(
            f"{path} is truncated: its header announces {'x'.join(map(str, shape))} bytes of "
            f"data ({count}), the file holds {body}"
        )
    if body > count:
        raise IdxFormatError(
            f"{path} has {body - count} bytes after the {'x'.join(map(str, shape))} array its "
            "header announces: not a valid IDX file"
        )
    return torch.frombuffer(bytearray(data[header_size:]), dtype=torch.uint8).view(shape)


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor (tests write small MNIST-like files with it)."""
    if array.dtype != torch.uint8:
        raise ValueError(f"array must be uint8, got {array.dtype}")
    header = bytes([0, 0, UNSIGNED_BYTE, array.dim()])
    header += b"".join(size.to_bytes(_DIM_BYTES, "big") for size in array.shape)
    return header + bytes(array.flatten().tolist())
