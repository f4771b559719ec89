"""Running a request's jobs: its deadline, admission, the queue, and giving up when the client goes away.

A handler turns its input into one payload per image or latent and hands them here; the broker
enqueues them all or none and this module waits for the replies within the request's deadline,
cancelling the jobs as soon as the client disconnects so no worker computes an answer nobody reads.
Admission happens twice: `admitted(task)` refuses (429) before the body is read when the queue
has no room at all, and the enqueue itself refuses when this request's jobs would pass a bound.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import Field, TypeAdapter, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics, timing
from service.api.auth import bearer, check_key
from service.api.errors import handler_for
from service.api.state import AppState, State, state_of
from service.broker_protocol import Reply, now_ms
from service.direct import DirectLane
from service.errors import BadInput, ClientGone, QueueFull

TIMEOUT_HEADER = "x-request-timeout"
_TIMEOUT_TEXT = "Seconds this request may take, at most REQUEST_TIMEOUT_S (a longer value is capped)."
_TIMEOUT = TypeAdapter(Annotated[float, Field(gt=0, allow_inf_nan=False)])
TIMEOUT_PARAMETER: dict[str, Any] = {
    "name": TIMEOUT_HEADER,
    "in": "header",
    "required": False,
    "schema": {
        "anyOf": [_TIMEOUT.json_schema(), {"type": "null"}],
        "description": _TIMEOUT_TEXT,
        "title": "X-Request-Timeout",
    },
    "description": _TIMEOUT_TEXT,
}
"""The OpenAPI parameter of X-Request-Timeout, which `admitted` reads itself (so an inference
route's checks are one dependency, see there)."""


def request_deadline(state: AppState, timeout_s: float | None) -> int:
    """The request's deadline in epoch ms: REQUEST_TIMEOUT_S, or a shorter X-Request-Timeout."""
    timeout = state.settings.request_timeout_s
    if timeout_s is not None:
        timeout = min(timeout, timeout_s)
    return now_ms() + int(timeout * 1000)


def timeout_header(value: str | None) -> float | None:
    """X-Request-Timeout as seconds: a finite number > 0, else the 422 FastAPI gives a bad header."""
    if value is None:
        return None
    try:
        return _TIMEOUT.validate_python(value)
    except ValidationError as exc:
        error = {**exc.errors()[0], "loc": ("header", TIMEOUT_HEADER), "input": value}
        raise RequestValidationError([error]) from None


@dataclass(frozen=True)
class Admitted:
    """What an inference handler gets from `admitted(task)`."""

    state: AppState
    due: int
    """The request's deadline, epoch ms."""


def refusal(state: AppState, task: str) -> str | None:
    """Why `task` takes no request now, when that is known without I/O: its decoding pool is full
    (encode), or this replica saw its queue full a moment ago."""
    if task == "encode" and (why := state.images.refusal()) is not None:
        return why
    return state.broker.refusal(task) if state.broker is not None else None


def open_lane(state: AppState, task: str) -> DirectLane | None:
    """This replica's direct lane, while it is lightly loaded for `task`: fewer of its requests are
    running (in the lane or waiting on the queue) than the lane has slots, and none waits in the queue.

    Under load the workers' batches take the traffic, and a request never overtakes one queued
    before it. Counting running requests, not only queued jobs, keeps a busy replica on the queue
    when its queue drains for a moment between batches (at concurrency 32 the lane otherwise took a
    slice of the traffic at every batch boundary).
    """
    lane = state.lane
    if lane is None or state.running.get(task, 0) >= lane.slots:
        return None
    if state.broker is not None and state.broker.queued(task):
        return None
    return lane


def admitted(task: str) -> Callable[..., Coroutine[Any, Any, Admitted]]:
    """The one dependency of a task's route: the API key (401), the request's deadline (a bad
    X-Request-Timeout is a 422), and admission: 429 before the body is read when the task cannot
    take a job (`service.api.middleware.RequestEdge` answers the cases known without I/O even earlier).

    One dependency, not one per check: FastAPI resolves each dependency of a route on every
    request, and the four these checks were spread over cost 0.13 ms of the event loop's CPU per
    request (measured at concurrency 1, about 5 % of a decode request's CPU).
    """

    async def admit(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> Admitted:
        state = state_of(request.app)
        check_key(state, request, credentials)
        due = request_deadline(state, timeout_header(request.headers.get(TIMEOUT_HEADER)))
        try:
            why = refusal(state, task)
            if why is not None:
                raise QueueFull(why)
            lane = open_lane(state, task)
            if lane is None or not lane.free(task):
                # A one-job request the lane will compute skips this; a larger one meets the enqueue's exact check.
                await state.jobs().admit(task)
        except QueueFull:
            metrics.REJECTED.labels(task, "queue_full").inc()
            raise
        return Admitted(state, due)

    admit.task = task  # type: ignore[attr-defined]  # how InferenceRoute recognises it
    return admit


class InferenceRoute(APIRoute):
    """An inference route that calls its one dependency, `admitted(task)`, itself.

    Why. FastAPI resolves a route's dependencies on every request with a general machine (cache
    keys, security scopes, parameter extraction from the query, cookies and headers of every
    sub-dependency), and wraps the endpoint in two exit stacks; for these routes that was about a
    third of the event loop's CPU per request (0.18 ms of 0.70 for an encode request, 0.14 of 0.68
    for a decode, with the graphs' answers cached; in process, per `time.process_time`), and the
    API's own Python per request is what kept it behind a plain FastAPI server on two cores. The
    route stays FastAPI's in every other respect: its path, methods, OpenAPI operation and security
    scheme, the exception handlers its errors go through. Only the call is direct, which is why the
    route checks when it is built that its endpoint is `(request, call)`, with `call` from
    `admitted(task)` and that dependency's only input the bearer credentials; and why
    `app.dependency_overrides` does not reach these two dependencies (nothing here overrides them:
    tests run the real checks against a real or stand-in broker).
    """

    @property
    def task(self) -> str:
        """The task whose admission this route checks (`admitted(task)`)."""
        return _admission_of(self.path, self.dependant).task  # type: ignore[attr-defined]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint, admit = self.endpoint, _admission_of(self.path, self.dependant)

        async def handle(request: Request) -> Response:
            return await endpoint(request, await admit(request, await bearer(request)))

        return handle

    def edge_app(self, handlers: Mapping[Any, Callable[..., Any]]) -> ASGIApp:
        """This route as an ASGI app the request edge calls itself for a POST to its path
        (`service.api.middleware.RequestEdge`), past Starlette's exception middleware and router.

        Why. Routing a request through the app's included routers (matched twice over, once to
        find the router and once in it), the exception middleware and FastAPI's exit stacks cost
        40–60 µs of the event loop per inference request, about a tenth of the API's own work for
        the small model (in process, `time.process_time`, graphs' answers cached). An inference
        path is exact and takes POST alone, so the edge knows the route from the path. Errors go to
        the app's exception `handlers` (`app.exception_handlers`, read at each error so handlers
        added later count), chosen as Starlette chooses them (`errors.handler_for`); those without
        one (a bug) go on to the outermost error middleware, as from the router.
        """
        handle = self.get_route_handler()
        route_scope = {"route": self, "endpoint": self.endpoint, "path_params": {}}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope.update(route_scope)
            request = Request(scope, receive, send)
            try:
                response = await handle(request)
            except Exception as exc:
                handler = handler_for(handlers, exc)
                if handler is None:
                    raise
                response = handler(request, exc)
                if inspect.isawaitable(response):
                    response = await response
                # An exception instance may be raised again: its frames need not live on.
                exc.__traceback__ = None
            await response(scope, receive, send)

        return app


def _admission_of(path: str, dependant: Dependant) -> Callable[..., Coroutine[Any, Any, Admitted]]:
    """The `admitted(task)` dependency of an inference route's endpoint, or TypeError saying why
    the endpoint does not have the form `InferenceRoute` calls."""
    params = [p.name for p in (*dependant.path_params, *dependant.query_params, *dependant.header_params)]
    deps = dependant.dependencies
    if (
        not inspect.iscoroutinefunction(dependant.call)
        or dependant.request_param_name is None
        or params
        or dependant.body_params
        or len(deps) != 1
        or getattr(deps[0].call, "task", None) is None
        or [d.call for d in deps[0].dependencies] != [bearer]
    ):
        raise TypeError(
            f"{path}: an InferenceRoute endpoint is `async def` and takes (request: Request, call: "
            "Annotated[Admitted, Depends(admitted(task))]) and nothing else"
        )
    return deps[0].call


def check_cost(state: State, task: str, cost: int, what: str) -> None:
    """422 when a request asks for more work than MAX_REQUEST_COST (`what` says how it adds up)."""
    limit = state.settings.max_request_cost
    if cost > limit:
        metrics.REJECTED.labels(task, "too_costly").inc()
        raise BadInput(
            f"this request costs {cost} units ({what}), over the limit of {limit} (MAX_REQUEST_COST); "
            "ask for fewer images or steps"
        )


async def _watch_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_done_or_gone(request: Request, work: Awaitable[list[Reply]]) -> list[Reply]:
    """Await the jobs, but give up (cancelling them) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone("the client closed the connection; its jobs were cancelled")


async def run_jobs(
    request: Request, state: AppState, task: str, payloads: Sequence[dict], deadline_ms: int
) -> list[Reply]:
    """Run one job per payload and return the replies in order: in this replica's direct lane when
    it has room for them all (`service.direct`), else through the queue; a full queue is counted,
    then raised."""
    lane = open_lane(state, task)
    direct = lane.try_submit(task, payloads, deadline_ms) if lane is not None else None
    state.running[task] = state.running.get(task, 0) + 1
    try:
        if direct is not None:
            # One graph call already running, which a departed client could not stop: not worth a
            # task watching the connection (the answer to a closed connection is simply dropped).
            return await direct
        return await until_done_or_gone(request, state.jobs().submit(task, payloads, deadline_ms))
    except QueueFull:
        metrics.REJECTED.labels(task, "queue_full").inc()
        raise
    finally:
        state.running[task] -= 1


def timing_headers(replies: Sequence[Reply]) -> dict[str, str]:
    """X-Queue-Ms / X-Compute-Ms: the slowest job's queue wait and compute time (also stages of the
    request's Server-Timing)."""
    queue, compute = max(r.queue_ms for r in replies), max(r.compute_ms for r in replies)
    timing.note("queue", queue)
    timing.note("compute", compute)
    return {"X-Queue-Ms": f"{queue:.1f}", "X-Compute-Ms": f"{compute:.1f}"}
