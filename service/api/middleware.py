"""The API's one ASGI middleware (`RequestEdge`): Server-Timing, request metrics per endpoint, the
early refusal of requests to a full queue, the request body's size and time limits, and the
inference routes' dispatch."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics, timing
from service.api.auth import has_key
from service.api.jobs import InferenceRoute, refusal
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


class RequestEdge:
    """What the API does to every HTTP request before FastAPI routes it, as one ASGI layer:

    - `Server-Timing`: a stage timer per request (`service.timing`), its stages in the answer;
    - request metrics: count, latency and in-flight gauge per endpoint and status, labelled from
      `routes` (a path no labelled route matches, such as /metrics, is not counted);
    - early refusal: 429 for an inference request whose task is known to be full, before routing.
      Under a burst on a full queue most requests are refused; answering those here (a lookup of
      what `service.api.jobs.refusal` already knows: no Redis round trip, no routing, no body) keeps
      each refusal near the cost of parsing its headers. Requests without the API key (when one is
      set) pass, to get their 401; everything else the route decides (`service.api.jobs.admitted`);
    - the body's limits (`BodyLimits`): 413 over MAX_BODY_BYTES, 408 for a stalled body;
    - dispatch: a POST to an inference route's path goes straight to that route
      (`service.api.jobs.InferenceRoute.edge_app`, errors to the app's exception `handlers`);
      everything else (other paths, other methods: their 405) goes through FastAPI's router.

    One layer, not one middleware each: every ASGI middleware adds a coroutine and a wrapped send
    or receive to each request, and the four this replaces cost 0.06–0.1 ms of the event loop per
    request (in process, `time.process_time`, graphs' answers cached), a tenth of the API's own
    work on a small model. Plain ASGI (not Starlette's BaseHTTPMiddleware), so it sees every answer,
    those of exception handlers included, and counts a streamed body as it arrives. The order is
    the old stack's: the metrics and Server-Timing see the early 429 and the 413 too.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        limits: BodyLimits,
        handlers: Mapping[Any, Callable[..., Any]],
    ) -> None:
        self.app = app
        self.label_of = endpoint_labels(routes)
        self.limits = limits
        self.routed: tuple[str | None, ASGIApp] = (None, app)
        """No task and FastAPI's router: any request but a POST to an inference path."""
        # path → (task, the route's app), for the POSTs refused early and dispatched here.
        self.inference = {
            route.path: (route.task, route.edge_app(handlers))
            for route in routes
            if isinstance(route, InferenceRoute) and route.methods == {"POST"}
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = self.label_of(path)
        timer, token = timing.start()
        status = 500

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), timing.header_of(timer)]
            await send(message)

        inflight = metrics.child(metrics.INFLIGHT, endpoint) if endpoint is not None else None
        if inflight is not None:
            inflight.inc()
        try:
            headers = dict(scope["headers"])
            task, route = self.inference.get(path, self.routed) if scope["method"] == "POST" else self.routed
            why = self._refusal(scope, task, headers) if task is not None else None
            if why is not None:
                metrics.child(metrics.REJECTED, task, "queue_full").inc()
                await _send_json(answer, 429, why, [(b"retry-after", b"1")])
                return
            guarded = self.limits.guard(headers, receive)
            if isinstance(guarded, str):
                await _send_json(answer, 413, guarded, [(b"connection", b"close")])
                return
            await route(scope, guarded, answer)
        finally:
            timing.stop(token)
            if inflight is not None:
                inflight.dec()
                code = str(status)
                metrics.child(metrics.REQUESTS, endpoint, code).inc()
                metrics.child(metrics.REQUEST_DURATION, endpoint, code).observe(
                    time.perf_counter() - timer.start
                )

    @staticmethod
    def _refusal(scope: Scope, task: str, headers: dict[bytes, bytes]) -> str | None:
        """Why `task` takes nothing now, for a request that carries the API key (when one is set)."""
        state = state_of(scope["app"])
        authorization = headers.get(b"authorization")
        if not has_key(state.settings, authorization.decode("latin-1") if authorization else None):
            return None
        return refusal(state, task)


class BodyLimits:
    """The request body's limits: MAX_BODY_BYTES (by Content-Length before reading, or counted as a
    chunked upload arrives); BODY_TIMEOUT_S of silence between two chunks (a 408: a client that
    stalls mid-upload must not hold the connection for the whole request deadline); and
    REQUEST_TIMEOUT_S for the whole body (a 408: a client trickling a byte now and then must not
    hold it for ever). These answers close the connection: the rest of such a body is not worth
    reading. A body the app answers without reading is the connection protocol's to time
    (`service.api.server`).
    """

    def __init__(self, max_bytes: int, idle_timeout_s: float, total_timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    def guard(self, headers: dict[bytes, bytes], receive: Receive) -> Receive | str:
        """`receive` with the limits applied, or why the declared body is refused (a 413);
        `headers` are the request's, as a dict."""
        limit, idle = self.max_bytes, self.idle_timeout_s
        declared = headers.get(b"content-length")
        if declared is not None:
            size = int(declared) if declared.isdigit() else -1
            if size > limit:
                return f"body of {size} bytes exceeds the limit of {limit} bytes (MAX_BODY_BYTES)"
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

        return guarded_receive


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
