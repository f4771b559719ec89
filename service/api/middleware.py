"""ASGI middleware: request metrics per endpoint, the request body's size and time limits, and the
early refusal of requests to a full queue.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so they see every response, including
those of exception handlers, and so a streamed body can be counted as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.auth import has_key
from service.api.jobs import refusal
from service.api.state import state_of
from service.errors import PayloadTooLarge, RequestTimeout

_LABEL = "metrics_endpoint_label"
Handler = TypeVar("Handler", bound=Callable[..., Any])


def endpoint_label(label: str) -> Callable[[Handler], Handler]:
    """Count the decorated handler's requests in the request metrics under `endpoint=label`.

    Several routes may share a label (the Open Inference Protocol aliases of /healthz and /readyz);
    a handler without one (/metrics, the docs) is not counted, so scrapes do not drown the traffic.
    """

    def mark(handler: Handler) -> Handler:
        setattr(handler, _LABEL, label)
        return handler

    return mark


def endpoint_labels(routes: Sequence[BaseRoute]) -> Callable[[str], str | None]:
    """path → metrics label, matched against the labelled routes' own path patterns.

    The match is on the path alone, so a wrong method (405) still counts under its endpoint.
    """
    table: list[tuple[re.Pattern[str], str]] = [
        (route.path_regex, label)
        for route in routes
        if isinstance(route, APIRoute) and (label := getattr(route.endpoint, _LABEL, None))
    ]

    def label_of(path: str) -> str | None:
        return next((label for pattern, label in table if pattern.match(path)), None)

    return label_of


class RequestMetrics:
    """Request count, latency and in-flight gauge per endpoint and status, labelled from `routes`."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.label_of = endpoint_labels(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.label_of(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        metrics.INFLIGHT.labels(endpoint).inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.INFLIGHT.labels(endpoint).dec()
            code = str(status["code"])
            metrics.REQUESTS.labels(endpoint, code).inc()
            metrics.REQUEST_DURATION.labels(endpoint, code).observe(time.perf_counter() - start)


class RequestBody:
    """The request body's limits: MAX_BODY_BYTES (by Content-Length before reading, or counted as a
    chunked upload arrives); BODY_TIMEOUT_S of silence between two chunks (a 408: a client that
    stalls mid-upload must not hold the connection for the whole request deadline); and
    REQUEST_TIMEOUT_S for the whole body (a 408: a client trickling a byte now and then must not
    hold it for ever). These answers close the connection: the rest of such a body is not worth
    reading. A body the app answers without reading is the connection protocol's to time
    (`service.api.server`).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout_s: float, total_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, idle = self.max_bytes, self.idle_timeout_s
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        if declared is not None:
            size = int(declared) if declared.isdigit() else -1
            if size > limit:
                await self._refuse(send, size)
                return
        # A request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112 §6.3).
        state = {"complete": declared in (None, b"0") and b"transfer-encoding" not in headers, "seen": 0}

        total_end = time.monotonic() + self.total_timeout_s

        async def guarded_receive() -> Message:
            if state["complete"]:
                return await receive()
            left = total_end - time.monotonic()
            try:
                # A timeout scope, not wait_for: wait_for wraps receive() in a task of its own, which
                # cost 0.07 ms of the event loop per request (a body already read returns at once).
                async with asyncio.timeout(max(min(idle, left), 0)):
                    message = await receive()
            except TimeoutError:
                metrics.SLOW_CLIENTS.labels("body").inc()
                why = (
                    f"no data for {idle:g} s (BODY_TIMEOUT_S)"
                    if idle < left
                    else f"not complete after {self.total_timeout_s:g} s (REQUEST_TIMEOUT_S)"
                )
                raise RequestTimeout(f"the request body stalled: {why}") from None
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (MAX_BODY_BYTES)")
                state["complete"] = not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)

    async def _refuse(self, send: Send, declared: int) -> None:
        detail = f"body of {declared} bytes exceeds the limit of {self.max_bytes} bytes (MAX_BODY_BYTES)"
        await _send_json(send, 413, detail, [(b"connection", b"close")])


class EarlyRefusal:
    """429 for an inference request whose task is known to be full, before FastAPI routes it.

    Under a burst on a full queue most requests are refused; answering those from here (a lookup
    of what `service.api.jobs.refusal` already knows, no Redis round trip, no routing or dependency
    resolution, no body) keeps each refusal near the cost of parsing its headers. Requests without
    the API key (when one is set) pass through, to get their 401. Everything else is decided by the
    route itself (`service.api.jobs.admission`).
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.tasks = {
            route.path: label
            for route in routes
            if isinstance(route, APIRoute)
            and "POST" in route.methods
            and (label := getattr(route.endpoint, _LABEL, None))
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self.tasks.get(scope.get("path", "")) if scope["type"] == "http" else None
        if task is not None and scope["method"] == "POST":
            state = state_of(scope["app"])
            authorization = dict(scope["headers"]).get(b"authorization")
            if has_key(state.settings, authorization.decode("latin-1") if authorization else None):
                why = refusal(state, task)
                if why is not None:
                    metrics.REJECTED.labels(task, "queue_full").inc()
                    await _send_json(send, 429, why, [(b"retry-after", b"1")])
                    return
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
