"""Where one request's time went, answered in its `Server-Timing` header (W3C Server Timing).

    Server-Timing: parse;dur=0.21, enqueue;dur=0.09, queue;dur=0.4, compute;dur=1.9, transit;dur=0.6,
                   wait;dur=2.9, encode;dur=0.15, app;dur=3.4

Stages, in milliseconds:

- `parse`: from the app receiving the request to its jobs' payloads being ready: the body read,
  decoded and checked (JSON, base64, .npy; images decoded, resized and cropped);
- `enqueue`: the jobs queued (the enqueue script's Redis round trip);
- `wait`: from queued to the last reply, made of `queue` (the slowest job's wait for a worker),
  `compute` (the runtime's time for that job's batch) and `transit` (the rest: the worker's own
  Redis traffic and bookkeeping, and the reply's way back through the reply stream);
- `encode`: the answer built (PNG, base64, JSON or .npy);
- `app`: all of it, from the app's first look at the request to the first byte of its answer.

What `app` leaves out of the client's latency is HTTP parsing, the connection and the client itself.
The timer lives in a context variable set for each request (`start`), so the code that marks a stage (the
handlers, the broker) needs no parameter for it, and outside a request `mark` does nothing.
"""

from __future__ import annotations

import contextvars
import time

_current: contextvars.ContextVar[StageTimer | None] = contextvars.ContextVar("pae_stage_timer", default=None)


class StageTimer:
    """Stage durations of one request, each from the previous mark."""

    __slots__ = ("last", "stages", "start")

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (now - self.last) * 1000
        self.last = now

    def header(self) -> bytes:
        stages = self.stages
        if "wait" in stages and "compute" in stages:
            stages["transit"] = max(stages["wait"] - stages["compute"] - stages.get("queue", 0.0), 0.0)
        stages["app"] = (time.perf_counter() - self.start) * 1000
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in stages.items()).encode()


def mark(stage: str) -> None:
    """Close `stage` of the current request: the time since its previous mark (or its start)."""
    timer = _current.get()
    if timer is not None:
        timer.mark(stage)


def note(stage: str, ms: float) -> None:
    """Record a duration measured elsewhere (the worker's queue and compute times)."""
    timer = _current.get()
    if timer is not None:
        timer.stages[stage] = ms


def start() -> tuple[StageTimer, contextvars.Token[StageTimer | None]]:
    """Time a request from now (`service.api.middleware.RequestEdge` does, for every HTTP request);
    `stop(token)` when it is answered."""
    timer = StageTimer()
    return timer, _current.set(timer)


def stop(token: contextvars.Token[StageTimer | None]) -> None:
    _current.reset(token)


def header_of(timer: StageTimer) -> tuple[bytes, bytes]:
    """The `Server-Timing` header of a request answered now: whatever happened since its last mark
    is the `encode` stage."""
    if timer.stages:
        timer.mark("encode")
    return (b"server-timing", timer.header())
