"""Hashes and provenance for a model-repository version.

The manifest is what makes a version trustworthy: every file's sha256 (so a corrupted or swapped
graph is refused at load), the hashes of the checkpoint it came from (so a version can be traced to
its training run), and the exporter and runtime versions (ONNX graphs and TensorRT engines are not
portable across every version).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pae-model-repository/1"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB graphs do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(
    root: Path, exclude: frozenset[str] = frozenset({MANIFEST_NAME})
) -> dict[str, dict[str, object]]:
    """`{relative posix path: {"sha256", "bytes"}}` for every regular file under `root`.

    Symlinks are refused: a repository must be self-contained, and a link could point anywhere.
    """
    files: dict[str, dict[str, object]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise ValueError(f"{root}: {rel} is a symbolic link; repository files must be regular files")
        if path.is_dir() or rel in exclude:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Versions of everything that shaped or will read the graphs (None for what is absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt"):
        versions[package] = _version(package)
    return versions
