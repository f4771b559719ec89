"""Fixtures: a real redis-server per module, the tiny model repository, and live API servers.

Everything is real: redis-server processes, uvicorn serving the app over TCP, workers running the
ONNX Runtime backend on exported graphs. Prometheus metrics are process-global, so tests compare
values before and after their own traffic.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis
import torch
import uvicorn
from prometheus_client import REGISTRY

from export import tiny_repository as tiny
from service.api.server import PROTOCOL
from service.app import create_app
from service.embedded import WorkerThread
from service.launcher import free_port
from service.redis_server import RedisServer
from service.settings import Settings

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_repository(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model repository, exported once and reused (through pytest's cache) while
    export/tiny_repository.py and torch are unchanged; without the cache plugin it is exported into a
    temporary folder."""
    source = Path(tiny.__file__).read_bytes()
    key = hashlib.sha256(source + torch.__version__.encode()).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tiny.build_tiny_repository(tmp_path_factory.mktemp("tiny-repo")).parents[1]
    root = Path(cache.mkdir(f"pae-service-tiny-{key}"))
    if not (root / "tiny" / "1" / "manifest.json").is_file():
        staging = root.with_name(root.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        tiny.build_tiny_repository(staging)
        shutil.rmtree(root)
        staging.rename(root)
    return root


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free port for this test module, stopped afterwards."""
    server = RedisServer()
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    return redis_url


def make_settings(repository: Path, redis_url: str | None, **overrides: object) -> Settings:
    base = Settings(
        redis_url=redis_url,
        model_repository=repository,
        model_name="tiny",
        ort_intra_op_threads=1,
        max_batch_size={"encode": 8, "decode": 8, "generate": 8},
        max_wait_ms={"encode": 2, "decode": 2, "generate": 20},
        # A batch's graph runs in one call, as the batching tests count calls (the measured size
        # is tested in test_graph_batch).
        graph_batch_size={"encode": 8, "decode": 8},
        queue_max_len=64,
        request_timeout_s=20.0,
        max_num_images=8,
        max_steps=50,
        max_body_bytes=1 << 20,
        claim_idle_ms=1000,
        max_deliveries=3,
        worker_metrics_port=0,
    )
    return replace(base, **overrides)


class LiveServer:
    """uvicorn serving an app on a free port in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            http=PROTOCOL,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class RestartableStack:
    """Its own redis-server, one worker and one live API server, for tests that stop Redis under the
    service and bring it back (empty) on the same address."""

    def __init__(self, repository: Path, **overrides: object) -> None:
        self.store = RedisServer()
        url = self.store.start()
        settings = make_settings(repository, url, **overrides)
        self.worker = WorkerThread(settings, url)
        self.server = LiveServer(settings)

    def restart_redis(self) -> None:
        """Start a fresh redis-server where the stopped one was."""
        self.store.start()

    def __enter__(self) -> RestartableStack:
        self.worker.start()
        try:
            self.server.__enter__()
        except BaseException:
            self.worker.stop()
            self.store.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)
        self.worker.stop()
        self.store.stop()


@pytest.fixture
def live(tiny_repository: Path, clean_redis: str):
    """Factory: start an API server (and optionally an embedded worker) with settings overrides."""
    started: list[object] = []

    def start(worker: bool = True, **overrides: object) -> tuple[LiveServer, WorkerThread | None]:
        settings = make_settings(tiny_repository, clean_redis, **overrides)
        thread = None
        if worker:
            thread = WorkerThread(settings, clean_redis)
            thread.start()
            started.append(thread)
        server = LiveServer(settings).__enter__()
        started.append(server)
        return server, thread

    yield start
    for item in reversed(started):
        if isinstance(item, LiveServer):
            item.__exit__(None, None, None)
        else:
            # A worker left running would heartbeat into the next test's Redis and count as its worker.
            assert item.stop(timeout_s=60.0), "an embedded worker did not stop"


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a metric sample in this process (0 when it has not been created yet)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def client(server: LiveServer, **kwargs: object) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)
