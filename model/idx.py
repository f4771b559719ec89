"""Reader for the IDX format used by (Fashion-)MNIST, with validation.

The format is tiny and the files come from outside the project (a Debian package, or a copy the
user points at), so every structural property is checked and a bad file is reported by its path
instead of surfacing later as a reshape error or silently wrong labels. It lives in `model/` (numpy
only) because both training's datasets and export's parity images read these files, and export must
not import training.

Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one big-endian
uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

_UINT8 = 0x08


class IDXFormatError(ValueError):
    """An IDX file is missing, truncated or does not have the expected header."""


def read_idx(path: str | os.PathLike[str], expected_shape: tuple[int | None, ...]) -> np.ndarray:
    """Read a (gzip-compressed or raw) uint8 IDX file and check its shape.

    `expected_shape` gives the number of dimensions and, per dimension, the required size or None
    for "any" (the number of items differs between splits, the image size does not).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            with open(path, "rb") as fh:
                raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise IDXFormatError(f"{path}: cannot decompress/read IDX file ({exc})") from exc

    if len(raw) < 4:
        raise IDXFormatError(f"{path}: file has {len(raw)} bytes, too short for an IDX header (4 bytes)")
    zero0, zero1, dtype_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic {raw[:4].hex()}: expected the first two bytes to be 00 00"
        )
    if dtype_code != _UINT8:
        raise IDXFormatError(f"{path}: IDX type code 0x{dtype_code:02x}, expected 0x08 (uint8)")
    if ndim != len(expected_shape):
        raise IDXFormatError(f"{path}: IDX has {ndim} dimensions, expected {len(expected_shape)}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_len})")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    for axis, (got, want) in enumerate(zip(dims, expected_shape, strict=True)):
        if want is not None and got != want:
            raise IDXFormatError(f"{path}: dimension {axis} is {got}, expected {want} (dims {dims})")
    n_data = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header_len != n_data:
        raise IDXFormatError(
            f"{path}: payload is {len(raw) - header_len} bytes, expected {n_data} for dims {dims}"
        )
    # copy: frombuffer views the immutable bytes object, and torch warns about non-writable arrays
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()
