"""Running a request's jobs: its deadline, admission, the queue, and giving up when the client goes away.

A handler turns its input into one payload per image or latent and hands them here; the broker
enqueues them all or none and this module waits for the replies within the request's deadline,
cancelling the jobs as soon as the client disconnects so no worker computes an answer nobody reads.
Admission happens twice: `admission(task)` refuses (429) before the body is read when the queue
has no room at all, and the enqueue itself refuses when this request's jobs would pass a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from service import metrics, timing
from service.api.state import AppState, State, on_loop
from service.broker_protocol import Reply, now_ms
from service.direct import DirectLane
from service.errors import BadInput, ClientGone, QueueFull


def request_deadline(
    state: State,
    x_request_timeout: Annotated[
        float | None,
        Header(
            gt=0,
            allow_inf_nan=False,
            description="Seconds this request may take, at most REQUEST_TIMEOUT_S (a longer value is capped).",
        ),
    ] = None,
) -> int:
    """Dependency: the request's deadline in epoch ms, REQUEST_TIMEOUT_S or a shorter X-Request-Timeout."""
    timeout = state.settings.request_timeout_s
    if x_request_timeout is not None:
        timeout = min(timeout, x_request_timeout)
    return now_ms() + int(timeout * 1000)


Deadline = Annotated[int, Depends(on_loop(request_deadline))]
"""Handler parameter type: `due: Deadline` receives the request's deadline (epoch ms)."""


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


def admission(task: str) -> Callable[..., Coroutine[Any, Any, None]]:
    """Dependency of a task's route: 429 before the body is read when the task cannot take a job
    (`service.api.middleware.EarlyRefusal` answers the cases known without I/O even earlier)."""

    async def admit(state: State) -> None:
        try:
            why = refusal(state, task)
            if why is not None:
                raise QueueFull(why)
            lane = open_lane(state, task)
            if lane is not None and lane.free(task):
                return  # a one-job request computes here; a larger one meets the enqueue's exact check
            await state.jobs().admit(task)
        except QueueFull:
            metrics.REJECTED.labels(task, "queue_full").inc()
            raise

    return admit


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
