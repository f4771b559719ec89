"""The HTTP API: validate, enqueue on Redis, await the worker's reply, encode the answer.

An API replica checks every input (bad input is a 4xx naming the problem, never a 500), turns each
image or latent into one queued job, and waits for the replies through its single reply
dispatcher, within the request's deadline; it runs the model itself only in its direct lane
(`service.direct`, off unless DIRECT_SLOTS is set). A full queue answers 429 with Retry-After at
once, a passed deadline 504 (the jobs are cancelled, so no worker runs them), a client that goes
away cancels its jobs, and an unreachable Redis answers 503.

This module only assembles the app; the parts live in `service.api`:

- `inference`, `models`, `health`: the routers, each handler with its OpenAPI documentation;
- `state`: the one `AppState` the handlers fetch from `app.state`;
- `bodies`, `negotiation`, `jobs`, `auth`: reading bodies, media types, running jobs, the API key;
- `middleware`, `errors`, `openapi`: timing, metrics, early 429s and body limits, exception → response, the
  per-app values of the OpenAPI document.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.api import errors, health, inference, models, openapi
from service.api.middleware import BodyLimits, RequestEdge
from service.api.server import BODY_TIMEOUT_STATE, HEADER_TIMEOUT_STATE
from service.api.state import AppState, attach, state_of
from service.settings import Settings

ROUTERS = (inference.router, models.router, health.router)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Connect to Redis and start the reply dispatcher for as long as the app serves.

    The yielded state reaches uvicorn's connection protocol (`service.api.server`), which times
    out requests whose headers stall before the app ever sees them, and bodies answered unread.
    """
    state = state_of(app)
    async with state.connected():
        yield {
            HEADER_TIMEOUT_STATE: state.settings.header_timeout_s,
            BODY_TIMEOUT_STATE: state.settings.body_timeout_s,
        }


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for the model version the settings name (its config.json must exist)."""
    return build_app(AppState.load(settings or Settings.from_env()))


def fastapi_telemetry() -> dict[str, bool]:
    """FastAPI's own OpenTelemetry (FastAPI ≥ 0.142) when the operator opts in the way FastAPI
    documents, FASTAPI_OTEL_AUTO_CONFIGURE=true; otherwise off.

    The service reports through Prometheus and configures no OpenTelemetry provider, so without
    that opt-in FastAPI's telemetry never records anything, yet it looks for a configured provider
    on every request: 0.02–0.04 ms of the event loop per request (in process, `time.process_time`).
    """
    if os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return {}
    return {"tracing": False, "metrics": False, "logs": False}


def build_app(state: AppState) -> FastAPI:
    """The API over an already-built state: routers, middleware, exception handlers, lifespan."""
    app = FastAPI(
        title="PAE service",
        version="1",
        summary="Encode images to PAE latents, decode latents, and generate class-conditional images.",
        description=openapi.service_description(state),
        lifespan=lifespan,
        exception_handlers=errors.HANDLERS,
        telemetry=fastapi_telemetry(),
    )
    attach(app, state)
    for router in ROUTERS:
        app.include_router(router)
    routes = [route for router in ROUTERS for route in router.routes]
    settings = state.settings
    limits = BodyLimits(settings.max_body_bytes, settings.body_timeout_s, settings.request_timeout_s)
    app.add_middleware(RequestEdge, routes=routes, limits=limits, handlers=app.exception_handlers)
    openapi.install(app, state)
    return app
