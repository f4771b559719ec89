"""The IDX reader shared by training's datasets and export's parity images."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from model.idx import IDXFormatError, read_idx


def write_idx(path: str, array: np.ndarray, magic: bytes | None = None) -> None:
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


def test_idx_roundtrip_and_validation(tmp_path) -> None:
    good = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / "good.gz")
    write_idx(path, good)
    np.testing.assert_array_equal(read_idx(path, (None, 3, 4)), good)
    with pytest.raises(IDXFormatError, match=r"good\.gz: dimension 1 is 3, expected 28"):
        read_idx(path, (None, 28, 28))
    with pytest.raises(IDXFormatError, match=r"good\.gz: IDX has 3 dimensions, expected 1"):
        read_idx(path, (None,))

    bad_magic = str(tmp_path / "magic.gz")
    write_idx(bad_magic, good, magic=bytes([1, 2, 0x08, 3]))
    with pytest.raises(IDXFormatError, match=r"magic\.gz: bad IDX magic"):
        read_idx(bad_magic, (None, 3, 4))

    wrong_type = str(tmp_path / "type.gz")
    write_idx(wrong_type, good, magic=bytes([0, 0, 0x0D, 3]))
    with pytest.raises(IDXFormatError, match=r"type\.gz: IDX type code 0x0d"):
        read_idx(wrong_type, (None, 3, 4))

    truncated = str(tmp_path / "short.gz")
    with gzip.open(truncated, "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + b"\x00" * 5)
    with pytest.raises(IDXFormatError, match=r"short\.gz: payload is 5 bytes, expected 24"):
        read_idx(truncated, (None, 3, 4))

    not_gzip = str(tmp_path / "garbage.gz")
    with open(not_gzip, "wb") as fh:
        fh.write(b"this is not gzip at all")
    with pytest.raises(IDXFormatError, match=r"garbage\.gz"):
        read_idx(not_gzip, (None, 3, 4))


def test_uncompressed_files_read_too(tmp_path: Path) -> None:
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + good.tobytes())
    np.testing.assert_array_equal(read_idx(plain, (None, 3, 4)), good)
    plain.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + good.tobytes()[:-1])
    with pytest.raises(IDXFormatError, match=r"payload is 23 bytes, expected 24"):
        read_idx(plain, (None, 3, 4))
