"""The service's real topology as processes on 127.0.0.1, for the load and fault runs.

A redis-server with its append-only file on (as deployed; restartable in place on the same port and
data folder) or, with `sentinels`, a primary, a replica and three sentinels that the service reaches
through REDIS_SENTINELS (service/redis_topologies.py); API replicas (`pae-serve`) and workers
(`pae-worker`), all started by the service's own launcher (service/launcher.py) under a lifetime, so
nothing outlives a run that is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from benchmarks.machine import describe
from export.repository import list_versions
from service.launcher import LOOPBACK, Proc, Started, free_port, start_api, start_worker, stop_processes
from service.redis_server import RedisServer, find_redis_server
from service.redis_topologies import SentinelGroup

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "fmnist32-tiny"
LIFETIME_S = 3600


def machine_info() -> dict[str, object]:
    """The machine block, with the ONNX Runtime and redis-server versions the service ran on."""
    import onnxruntime

    version = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, check=False)
    return describe(onnxruntime=onnxruntime.__version__, redis_server=version.stdout.strip())


def resolve_model(repository: Path | None, scratch: Path) -> tuple[Path, str, str]:
    """(repository, model name, description): the real default model if exported, else the tiny one.

    The tiny random-weight repository (export/tiny_repository.py) is built into `scratch` in a few
    seconds, in a subprocess so this process does not pay for torch.
    """
    if repository is not None:
        names = sorted(p.name for p in repository.iterdir() if p.is_dir())
        if not names:
            raise SystemExit(f"{repository} holds no model folder")
        return repository, names[0], f"{names[0]} from {repository}"
    default = ROOT / "model_repository" / DEFAULT_MODEL
    versions = list_versions(default)
    if versions:
        latest = versions[-1]
        return default.parent, DEFAULT_MODEL, f"{DEFAULT_MODEL} v{latest} (model_repository)"
    subprocess.run(
        [sys.executable, "-m", "export.tiny_repository", str(scratch)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    description = "tiny random-weight repository (export/tiny_repository.py): no trained export yet"
    return scratch, "tiny", description


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Topology(Started):
    """redis-server (or a primary, replica and sentinels) + API replicas + workers as real processes
    on 127.0.0.1."""

    repository: Path
    model: str
    api_replicas: int = 2
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    redis_password: str | None = None
    sentinels: bool = False
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pae-bench-run-")))

    def __post_init__(self) -> None:
        self.group: SentinelGroup | None = None
        self.redis: RedisServer | None = None
        if self.sentinels:
            self.group = SentinelGroup(
                self.run_dir / "redis", password=self.redis_password, lifetime_s=LIFETIME_S
            )
        else:
            self.redis = RedisServer(
                password=self.redis_password,
                appendonly=True,
                workdir=self.run_dir / "redis",
                lifetime_s=LIFETIME_S,
                log=self.run_dir / "redis.log",
            )
        self.apis: list[Proc | None] = [None] * self.api_replicas
        self.worker_procs: list[Proc | None] = [None] * self.workers
        self._spawned = 0

    def redis_client(self) -> redis.Redis:
        """A client of the primary: the one server, or the one the sentinels name now."""
        port = self.group.primary_port() if self.group is not None else self.redis.port
        return redis.Redis(
            host=LOOPBACK,
            port=port,
            password=self.redis_password,
            socket_connect_timeout=1,
            socket_timeout=10,
        )

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAX_BATCH_SIZE_", "MAX_WAIT_MS_"))}
        if self.group is not None:
            env["REDIS_SENTINELS"] = self.group.addresses
            if self.redis_password:
                env["REDIS_PASSWORD"] = self.redis_password
        else:
            env["REDIS_URL"] = self.redis.url
        env.update(
            {
                "MODEL_REPOSITORY": str(self.repository),
                "MODEL_NAME": self.model,
                "OMP_NUM_THREADS": "1",
                "ORT_INTRA_OP_THREADS": "1",
                "QUEUE_MAX_LEN": "1024",
                "REQUEST_TIMEOUT_S": "30",
                "MAX_STEPS": "50",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(self.env)
        return env

    def _options(self, kind: str) -> dict[str, object]:
        self._spawned += 1
        log = self.run_dir / f"{kind}-{self._spawned}.log"
        return {"log": log, "base_env": self.base_env(), "cwd": ROOT, "lifetime_s": LIFETIME_S}

    def start_api(self, i: int, port: int | None = None) -> Proc:
        port = port or free_port()
        self.apis[i] = start_api(f"api{i}", port, ["--log-level", "warning"], **self._options("api"))
        return self.apis[i]

    def start_worker(self, i: int) -> Proc:
        options = self._options("worker")
        self.worker_procs[i] = start_worker(f"worker{i}", free_port(), ["--log-level", "warning"], **options)
        return self.worker_procs[i]

    def start(self, ready_timeout_s: float = 180.0) -> None:
        if self.group is not None:
            self.group.start()
        else:
            self.redis.start()
        for i in range(self.workers):
            self.start_worker(i)
        for i in range(self.api_replicas):
            self.start_api(i)
        self.wait_ready(ready_timeout_s)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p.port}" for p in self.apis if p is not None]

    def auth_headers(self) -> dict[str, str]:
        key = self.env.get("API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def wait_ready(self, timeout_s: float = 180.0, workers: int | None = None) -> None:
        """Every API replica reports at least `workers` live workers (default: all of them)."""
        want = self.workers if workers is None else workers
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in [*self.apis, *self.worker_procs]:
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail(60)}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                states = [
                    httpx.get(f"{u}/v1/models", timeout=2, headers=self.auth_headers()).json()
                    for u in self.urls
                ]
                if all(len(s["models"][0]["workers"]) >= want for s in states):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the topology did not become ready within {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every process and delete Redis's data folder and the logs."""
        stop_processes([p for p in [*self.apis, *self.worker_procs] if p is not None], grace_s=20.0)
        if self.group is not None:
            self.group.stop()
        else:
            self.redis.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def processes(self) -> dict[str, int]:
        """name → PID of every live service process and redis-server."""
        named = {
            p.name: p.program_pid for p in [*self.apis, *self.worker_procs] if p is not None and p.alive()
        }
        servers = self.group.servers if self.group is not None else [self.redis]
        named.update({server.name: server.pid for server in servers if server.pid})
        return named

    def worker_metrics(self) -> list[str]:
        """The /metrics text of every live worker."""
        texts = []
        for proc in self.worker_procs:
            if proc is not None and proc.alive():
                with contextlib.suppress(httpx.HTTPError):
                    texts.append(httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=5).text)
        return texts

    def api_metrics(self) -> list[str]:
        texts = []
        for url in self.urls:
            with contextlib.suppress(httpx.HTTPError):
                texts.append(httpx.get(f"{url}/metrics", timeout=5).text)
        return texts


def metric_sum(texts: Sequence[str], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`, over several exposition texts."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for text in texts:
        for line in text.splitlines():
            labelled = line.startswith(name + "{") and all(w in line for w in wanted)
            if labelled or (line.startswith(name + " ") and not wanted):
                total += float(line.rsplit(" ", 1)[1])
    return total
