"""The build context the image test builds from: the repository's git-known files, mirrored.

A mirror (not the work tree itself) lets the test time a rebuild after a source change by editing a
file in the mirror, never in the work tree. Files are copied only when their bytes differ, so an
unchanged repository leaves the mirror untouched and every cached layer valid.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_files(repo: Path = REPO) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (what a commit would carry)."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    return sorted({name for name in out.decode().split("\0") if name and (repo / name).is_file()})


def mirror(destination: Path, repo: Path = REPO) -> Path:
    """Make `destination` hold exactly the repository's git-known files; returns it."""
    wanted = set(git_files(repo))
    destination.mkdir(parents=True, exist_ok=True)
    for path in sorted(destination.rglob("*"), reverse=True):
        relative = path.relative_to(destination).as_posix()
        if path.is_file() and relative not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for name in wanted:
        source, target = repo / name, destination / name
        if not target.is_file() or not filecmp.cmp(source, target, shallow=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@contextlib.contextmanager
def source_edited(context: Path, relative: str = "service/__init__.py") -> Iterator[Path]:
    """A comment appended to one source file of the mirror for the duration (then restored)."""
    path = context / relative
    original, stat = path.read_bytes(), path.stat()
    path.write_bytes(original + b"\n# image test: a source-only change\n")
    try:
        yield path
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
