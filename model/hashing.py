"""File digests that tie derived data to the exact bytes it came from.

One streamed sha256 serves every record that names a file by its content: the model repository's
manifest, a checkpoint's stage records, the feature and LPIPS caches, the VFM fingerprint. It reads
1 MiB at a time because paper-scale weights and graphs are gigabytes. Torch-free, so the service's
repository reader can use it without torch installed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator

_CHUNK = 1 << 20


def _chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file's contents."""
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """One hex sha256 over several files in order; each file's size goes in first, so moving bytes
    from one file to the next changes the digest. Names do not count: a renamed copy hashes the same."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.stat(path).st_size.to_bytes(8, "little"))
        for chunk in _chunks(path):
            digest.update(chunk)
    return digest.hexdigest()
