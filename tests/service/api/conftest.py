"""An AppState built in code and a stand-in broker, so a router or helper runs without Redis or a worker.

The stand-in records what a handler asks the workers for and answers each job with a fixed
array: these tests check the HTTP layer's own logic (parsing, payloads, answer formats); the live
tests in tests/service check the same routes against a real redis-server and worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from fastapi.testclient import TestClient

from export.repository import ModelConfig
from service.api.state import AppState
from service.app import build_app
from service.broker_protocol import Reply
from service.errors import QueueFull
from service.settings import Settings

CONFIG = ModelConfig(
    name="tiny",
    version="1",
    image_size=16,
    latent_shape=(4, 4, 4),
    latent_mean=(0.0,) * 4,
    latent_std=(1.0,) * 4,
    class_names=("circle", "square", "stripe"),
    sampler={"sampler": "euler", "steps": 4, "shift": 1.0, "cfg_scale": 2.0, "cfg_interval": [0.0, 1.0]},
)
SETTINGS = Settings(redis_url="redis://unused", model_name="tiny", max_num_images=4, max_steps=50)


class StandInRedis:
    def __init__(self) -> None:
        self.up = True

    async def ping(self) -> bool:
        if not self.up:
            raise ConnectionError("stand-in Redis is down")
        return True


class StandInBroker:
    """What `BrokerClient` offers the API, answering every job at once."""

    def __init__(self) -> None:
        self.redis = StandInRedis()
        self.workers: list[dict[str, object]] = []
        self.submitted: list[tuple[str, list[dict], int]] = []
        self.full: set[str] = set()

    def refusal(self, task: str) -> str | None:
        return f"the {task} queue is full (stand-in)" if task in self.full else None

    def queued(self, task: str) -> int:
        return 0  # every job is answered at once

    async def admit(self, task: str) -> None:
        if task in self.full:
            raise QueueFull(self.refusal(task) or "")

    async def submit(self, task: str, payloads: Sequence[dict], deadline_ms: int) -> list[Reply]:
        self.submitted.append((task, list(payloads), deadline_ms))
        if task == "encode":
            shape, dtype = CONFIG.latent_shape, np.float32
        else:
            shape, dtype = (3, CONFIG.image_size, CONFIG.image_size), np.uint8
        return [
            Reply(
                job_id=str(i),
                ok=True,
                shape=shape,
                data=np.full(shape, i + 1, dtype).tobytes(),
                queue_ms=1.5,
                compute_ms=2.5,
            )
            for i in range(len(payloads))
        ]

    async def alive_workers(self, ttl_ms: int) -> list[dict[str, object]]:
        return self.workers


@pytest.fixture
def state() -> AppState:
    state = AppState.for_model(SETTINGS, CONFIG)
    state.broker = StandInBroker()  # type: ignore[assignment]
    return state


@pytest.fixture
def http(state: AppState) -> TestClient:
    """The whole app over the state, without its lifespan (so it never connects to Redis)."""
    return TestClient(build_app(state))
