"""ASGI middleware: request metrics per endpoint, and the body-size limit.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so they see every response, including
those of exception handlers, and so a streamed body can be counted as it arrives.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import PayloadTooLarge

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


class BodyLimit:
    """Refuse bodies over MAX_BODY_BYTES: by Content-Length before reading, or while streaming
    (chunked uploads declare no length, so the bytes are counted as they arrive)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await self._refuse(send, declared)
                    return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (MAX_BODY_BYTES)")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send, declared: int) -> None:
        # The unread body is still on the wire, so the connection cannot be reused: close it.
        detail = f"body of {declared} bytes exceeds the limit of {self.max_bytes} bytes (MAX_BODY_BYTES)"
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})
