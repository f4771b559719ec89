"""A BrokerClient and a real Worker on one event loop and a real Redis, for the broker's tests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from service.broker import BrokerClient
from service.broker_protocol import Keys
from service.runtimes.onnxruntime import OnnxRuntime
from service.settings import TASKS
from service.worker import Worker
from tests.service.conftest import make_settings

KEYS = Keys.for_model("tiny", "1")


def latent_payload(seed: int) -> dict[str, bytes]:
    z = np.random.default_rng(seed).standard_normal((4, 4, 4)).astype("<f4")
    return {"data": z.tobytes()}


def sampler_key(**fields: object) -> str:
    base = {"sampler": "euler", "steps": 3, "shift": 1.0, "cfg_scale": 2.0, "cfg_interval": [0.0, 1.0]}
    return json.dumps({**base, **fields}, sort_keys=True, separators=(",", ":"))


class Harness:
    """A BrokerClient and, on demand, a real Worker, sharing one event loop and Redis.

    `client` passes options to the BrokerClient (the lost-job check's timing); `settings` overrides
    the test settings.
    """

    def __init__(
        self,
        url: str,
        repository: Path,
        runtime: OnnxRuntime,
        client: dict[str, float] | None = None,
        **settings: object,
    ) -> None:
        self.url = url
        self.settings = make_settings(repository, url, **settings)
        self.runtime = runtime
        self.redis = Redis.from_url(url)
        self.client = BrokerClient(
            self.redis,
            KEYS,
            self.settings.queue_max_len,
            queue_max_cost=self.settings.queue_max_cost,
            **(client or {}),
        )
        self.worker: Worker | None = None
        self.worker_task: asyncio.Task | None = None

    async def __aenter__(self) -> Harness:
        await self.client.start(TASKS)
        return self

    async def start_worker(self) -> Worker:
        self.worker = Worker(self.settings, self.runtime)
        self.worker_task = asyncio.create_task(self.worker.run())
        while not self.worker.started.is_set():
            await asyncio.sleep(0.01)
        return self.worker

    async def queued(self, task: str, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` jobs of `task` are in the stream (an enqueue running in a task landed)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while await self.redis.xlen(KEYS.jobs(task)) != count:
            assert asyncio.get_running_loop().time() < deadline, "the jobs were never enqueued"
            await asyncio.sleep(0.01)

    async def drained(self, task: str, timeout: float = 10.0) -> None:
        """Wait until the task's stream holds no job (all run, dropped or dead-lettered)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while await self.redis.xlen(KEYS.jobs(task)):
            assert asyncio.get_running_loop().time() < deadline, "jobs were never taken off the queue"
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        if self.worker is not None:
            self.worker.stop()
            await self.worker_task
        await self.client.close()
        await self.redis.aclose()
