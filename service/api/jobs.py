"""Running a request's jobs: its deadline, the queue, and giving up when the client goes away.

A handler turns its input into one payload per image or latent and hands them here; the broker
enqueues them all or none and this module waits for the replies within the request's deadline,
cancelling the jobs as soon as the client disconnects so no worker computes an answer nobody reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Annotated

from fastapi import Depends, Header, Request

from service import metrics, timing
from service.api.state import State, on_loop
from service.broker import BrokerClient, Reply, now_ms
from service.errors import BadInput, ClientGone, QueueFull


def request_deadline(state: State, x_request_timeout: str | None = Header(None)) -> int:
    """Dependency: the request's deadline in epoch ms, REQUEST_TIMEOUT_S or a shorter X-Request-Timeout."""
    timeout = state.settings.request_timeout_s
    if x_request_timeout is not None:
        try:
            asked = float(x_request_timeout)
        except ValueError:
            raise BadInput(
                f"X-Request-Timeout must be a number of seconds, got {x_request_timeout!r}"
            ) from None
        if not 0 < asked < float("inf"):
            raise BadInput(f"X-Request-Timeout must be > 0 seconds, got {x_request_timeout!r}")
        timeout = min(timeout, asked)
    return now_ms() + int(timeout * 1000)


Deadline = Annotated[int, Depends(on_loop(request_deadline))]
"""Handler parameter type: `due: Deadline` receives the request's deadline (epoch ms)."""


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
    request: Request, broker: BrokerClient, task: str, payloads: Sequence[dict], deadline_ms: int
) -> list[Reply]:
    """Queue one job per payload and return the replies in order; a full queue is counted, then raised."""
    try:
        return await until_done_or_gone(request, broker.submit(task, payloads, deadline_ms))
    except QueueFull:
        metrics.REJECTED.labels(task, "queue_full").inc()
        raise


def timing_headers(replies: Sequence[Reply]) -> dict[str, str]:
    """X-Queue-Ms / X-Compute-Ms: the slowest job's queue wait and compute time (also stages of the
    request's Server-Timing)."""
    queue, compute = max(r.queue_ms for r in replies), max(r.compute_ms for r in replies)
    timing.note("queue", queue)
    timing.note("compute", compute)
    return {"X-Queue-Ms": f"{queue:.1f}", "X-Compute-Ms": f"{compute:.1f}"}
