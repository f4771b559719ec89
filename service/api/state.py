"""The one object every handler shares: settings, the served model, its request models, Redis.

It is stored on `app.state` and handlers fetch it with the `app_state` dependency, so handlers are
plain module-level functions rather than closures over a factory's locals: a test builds an
`AppState` from a `ModelConfig` and a stand-in broker and calls a router without Redis or a worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from redis.exceptions import RedisError

from export.repository import ModelConfig, resolve_version_dir
from service import metrics
from service.api.images import ImageDecoder
from service.broker import BrokerClient
from service.broker_protocol import Keys
from service.direct import TASKS as DIRECT_TASKS
from service.direct import DirectLane
from service.redis_client import open_redis
from service.runtimes import load_runtime
from service.schemas import Readiness, Schemas, build_schemas
from service.settings import TASKS, Settings, SettingsError
from service.worker import HEARTBEAT_TTL_MS


@dataclass
class AppState:
    """What one API replica serves and how it reaches the workers.

    `broker` is set while the app's lifespan runs (`connected`); everything else is fixed when the
    app is built. The image-decoding pool starts its threads on first use. `lane` is the direct
    lane (`service.direct`) when DIRECT_SLOTS > 0: this replica then holds the graphs too.
    """

    settings: Settings
    config: ModelConfig
    schemas: Schemas
    images: ImageDecoder
    broker: BrokerClient | None = field(default=None, repr=False)
    lane: DirectLane | None = field(default=None, repr=False)
    running: dict[str, int] = field(default_factory=dict, repr=False)
    """Requests of each task between the start and the end of their jobs (`service.api.jobs.run_jobs`)."""

    @classmethod
    def load(cls, settings: Settings) -> AppState:
        """The state for the model version the settings name (its config.json must exist)."""
        if not settings.redis_configured:
            raise SettingsError(
                "neither REDIS_URL nor REDIS_SENTINELS is set; pae-serve starts an embedded Redis then"
            )
        version_dir = resolve_version_dir(
            settings.model_repository, settings.model_name, settings.model_version
        )
        state = cls.for_model(settings, ModelConfig.load(version_dir))
        if settings.direct_slots:
            runtime = load_runtime(settings, version_dir)
            runtime.warmup({task: settings.direct_slots for task in DIRECT_TASKS})
            state.lane = DirectLane(runtime, settings.direct_slots, settings.batch_threads)
        return state

    @classmethod
    def for_model(cls, settings: Settings, config: ModelConfig) -> AppState:
        """The state for an already-read model config (no repository needed)."""
        return cls(
            settings=settings,
            config=config,
            schemas=build_schemas(settings, config),
            images=ImageDecoder(settings.image_decode_threads),
        )

    @property
    def provider(self) -> str:
        """The execution provider the settings ask for (for torch and TensorRT, the runtime's name)."""
        settings = self.settings
        return settings.ort_provider if settings.runtime == "onnxruntime" else settings.runtime

    @property
    def sampler_defaults(self) -> dict[str, object]:
        return dict(self.config.sampler)

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Open the Redis pool and the broker client (its reply dispatcher) for the app's lifetime."""
        settings, config = self.settings, self.config
        async with open_redis(settings, settings.redis_pool_size) as redis:
            broker = BrokerClient(
                redis,
                Keys.for_model(config.name, config.version),
                settings.queue_max_len,
                queue_max_cost=settings.queue_max_cost,
            )
            await broker.start(TASKS)
            self.broker = broker
            metrics.MODEL_INFO.labels(config.name, config.version, settings.runtime, self.provider).set(1)
            try:
                yield
            finally:
                await broker.close()

    def jobs(self) -> BrokerClient:
        """The broker client; only handlers call it, and they run inside the lifespan."""
        if self.broker is None:
            raise RuntimeError("the app's lifespan has not started: no broker client yet")
        return self.broker

    async def readiness(self) -> tuple[Readiness, list[dict[str, object]]]:
        """Ready means Redis answers and a worker for this model version sent a recent heartbeat."""
        config = self.config
        reasons = []
        redis_ok, workers = True, []
        broker = self.jobs()
        try:
            await broker.redis.ping()
            workers = await broker.alive_workers(HEARTBEAT_TTL_MS)
        except (RedisError, OSError) as exc:
            redis_ok = False
            reasons.append(f"Redis unreachable: {exc}")
        if redis_ok and not workers:
            reasons.append(
                f"no worker has sent a heartbeat for {config.name} v{config.version} in the last {HEARTBEAT_TTL_MS} ms"
            )
        state = Readiness(
            ready=not reasons,
            redis=redis_ok,
            workers=len(workers),
            model=config.name,
            version=config.version,
            reasons=reasons,
        )
        return state, workers


def attach(app: FastAPI, state: AppState) -> None:
    """Store the state where `app_state` finds it."""
    app.state.service = state


def state_of(app: FastAPI) -> AppState:
    return app.state.service


async def app_state(request: Request) -> AppState:
    """Dependency: the state of the app that received the request."""
    return state_of(request.app)


State = Annotated[AppState, Depends(app_state)]
"""Handler parameter type: `state: State` receives the app's `AppState`."""
