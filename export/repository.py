"""The versioned model repository: `<repository>/<name>/<version>/`, written atomically, verified on read.

A version is assembled in a hidden staging folder next to its final place and renamed into place
only after every graph passed parity and the manifest was written, so a reader (the service) never
sees a half-written version and a failed export leaves the repository exactly as it found it.
Versions are positive integers, like Triton's; the highest one is the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from export.manifest import MANIFEST_FORMAT, MANIFEST_NAME, hash_tree, sha256_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_STAGING_PREFIX = ".staging-"


class RepositoryError(RuntimeError):
    """A model repository, name or version is unusable (bad name, version taken, nothing exported)."""


class IntegrityError(RepositoryError):
    """A repository version's files do not match its manifest (corrupted, swapped, missing or extra)."""


def validate_name(name: str) -> str:
    """Model names become folder names: letters, digits, `.`, `_`, `-`, not starting with a dot."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RepositoryError(
            f"model name {name!r} is not usable as a folder name; use letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-')"
        )
    return name


def list_versions(model_dir: Path) -> list[int]:
    """Published integer versions under `model_dir`, ascending (staging folders and stray files ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version(model_dir: Path, requested: int | None) -> int:
    """The version to write: `requested` if free, else the next integer after the highest one."""
    existing = list_versions(model_dir)
    if requested is None:
        return (existing[-1] + 1) if existing else 1
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise RepositoryError(f"version must be a positive integer, got {requested!r}")
    if requested in existing:
        raise RepositoryError(
            f"version {requested} already exists in {model_dir}; versions are immutable, choose "
            f"another (next free: {existing[-1] + 1})"
        )
    return requested


def latest_version_dir(repository: Path, name: str) -> Path:
    """Folder of the highest published version of `name`, or a clear error when there is none."""
    model_dir = Path(repository) / validate_name(name)
    versions = list_versions(model_dir)
    if not versions:
        raise RepositoryError(f"no published versions of {name!r} in {repository}")
    return model_dir / str(versions[-1])


@contextmanager
def staged_version(repository: Path, name: str, version: int | None) -> Iterator[tuple[Path, int]]:
    """Yield `(staging_dir, version)`; on clean exit hash everything and rename it into place.

    The caller writes all files (graphs, config, `torch/`) and a `manifest.json` *without* the
    `files` table into `staging_dir`; on exit the file hashes are added and the folder is renamed to
    `<repository>/<name>/<version>`. Any exception removes the staging folder and any folder this
    call created, so a failure writes nothing.
    """
    repository = Path(repository)
    model_dir = repository / validate_name(name)
    created = [p for p in (repository, model_dir) if not p.exists()]
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=model_dir))
    try:
        chosen = resolve_version(model_dir, version)
        yield staging, chosen
        _seal(staging)
        final = model_dir / str(chosen)
        if final.exists():
            raise RepositoryError(f"{final} appeared while exporting (a concurrent export?); nothing written")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for path in reversed(created):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def _seal(staging: Path) -> None:
    """Add the sha256 of every file to the staged manifest, then make the version read-only."""
    manifest_path = staging / MANIFEST_NAME
    if not manifest_path.is_file():
        raise RepositoryError(f"staged version {staging} has no {MANIFEST_NAME}; refusing to publish it")
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = MANIFEST_FORMAT
    manifest["files"] = hash_tree(staging)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for path in staging.rglob("*"):
        if path.is_file():
            path.chmod(0o444)


def read_manifest(version_dir: Path) -> dict:
    """Parse a version's manifest, with a clear error for a missing or malformed one."""
    path = Path(version_dir) / MANIFEST_NAME
    if not path.is_file():
        raise IntegrityError(
            f"{version_dir} has no {MANIFEST_NAME}; it is not a published repository version"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(
            f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
            f"is not {MANIFEST_FORMAT!r}"
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise IntegrityError(f"{path} lists no files")
    return manifest


def verify_repository(version_dir: Path) -> dict:
    """Re-hash every file of a version against its manifest; return the manifest if all match.

    Refuses (IntegrityError naming the file) a file whose sha256 or size differs, a listed file that
    is missing, and a file present but not listed (an unlisted graph or engine could be loaded by
    mistake). Listed paths must stay inside the version folder.
    """
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    root = version_dir.resolve()
    for rel, entry in manifest["files"].items():
        path = (version_dir / rel).resolve()
        if root not in path.parents:
            raise IntegrityError(f"{version_dir}: manifest entry {rel!r} points outside the version folder")
        if not path.is_file():
            raise IntegrityError(f"{version_dir}: {rel} is listed in the manifest but missing")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise IntegrityError(f"{version_dir}: manifest entry for {rel} has no sha256")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise IntegrityError(
                f"{version_dir}: {rel} is {size} bytes, the manifest says {entry['bytes']}; "
                "the file is corrupted or was replaced"
            )
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise IntegrityError(
                f"{version_dir}: sha256 of {rel} is {actual}, the manifest says {entry['sha256']}; "
                "the file is corrupted or was replaced"
            )
    present = set(_present_files(version_dir))
    unlisted = sorted(present - set(manifest["files"]))
    if unlisted:
        raise IntegrityError(f"{version_dir}: files not listed in the manifest: {', '.join(unlisted)}")
    return manifest


def _present_files(root: Path) -> list[str]:
    """Relative posix paths of the files (and links) under `root`, the manifest itself excluded."""
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(name for name in names if name != MANIFEST_NAME)
