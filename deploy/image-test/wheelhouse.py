"""The CPU torch wheel this machine already has, served to the image build as a package index.

The Dockerfile's torch stage installs `torch==$TORCH_VERSION` with `--index-url $TORCH_INDEX_URL`
(PyTorch's CPU index by default). Here that index is replaced by a PEP 503 "simple" index on
127.0.0.1 holding the wheel pip already has on disk plus torch's dependencies at the versions of
deploy/docker/constraints.txt, so the build downloads no 200 MB wheel and never picks a CUDA build.
The build runs with `--network host` to reach it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "deploy" / "docker" / "constraints.txt"
PORT = 38741


def download(directory: Path, torch_version: str) -> list[Path]:
    """torch==`torch_version` and its dependencies as wheels in `directory/files` (pip's own cache,
    find-links and indexes decide where each comes from; constraints pin the dependencies)."""
    files = directory / "files"
    files.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--dest",
        str(files),
        "--constraint",
        str(CONSTRAINTS),
        f"torch=={torch_version}",
    ]
    subprocess.run(command, check=True)
    wheels = sorted(files.glob("*.whl"))
    if not any(w.name.startswith(f"torch-{torch_version}") for w in wheels):
        raise RuntimeError(f"pip download gave no torch {torch_version} wheel in {files}")
    return wheels


def project_name(wheel: Path) -> str:
    """PEP 503 normalised project name of a wheel file."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()


def write_index(directory: Path, wheels: list[Path]) -> None:
    """`directory/simple/<project>/index.html` linking each wheel with its sha256 (PEP 503)."""
    by_project: dict[str, list[Path]] = {}
    for wheel in wheels:
        by_project.setdefault(project_name(wheel), []).append(wheel)
    simple = directory / "simple"
    for project, project_wheels in by_project.items():
        links = []
        for wheel in project_wheels:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            href = html.escape(f"../../files/{wheel.name}#sha256={digest}")
            links.append(f'<a href="{href}">{html.escape(wheel.name)}</a><br>')
        (simple / project).mkdir(parents=True, exist_ok=True)
        (simple / project / "index.html").write_text(
            "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n"
        )
    root_links = "".join(f'<a href="{p}/">{p}</a><br>\n' for p in sorted(by_project))
    (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{root_links}</body></html>\n")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


@contextlib.contextmanager
def serve(directory: Path, port: int = PORT) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 for the duration; yields the index URL (`…/simple`).

    The URL is a build argument, part of every cache key below the torch stage: the same port each
    run keeps those layers cached (a free port is taken only when this one is busy).
    """
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="wheelhouse", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


def prepare(directory: Path, torch_version: str) -> Path:
    """Download the wheels and write the index; returns the directory to serve."""
    write_index(directory, download(directory, torch_version))
    return directory
