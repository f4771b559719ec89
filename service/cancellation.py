"""Which jobs of a running batch someone still waits for, and networks that compute only those.

A worker learns that a job was abandoned in two ways: its deadline passes (the worker's own clock
says so at any moment) or its client goes away (the API sets the request's cancel key, which the
worker's event loop reads while the batch computes). Generation looks before every sampler step
and leaves the abandoned images out of the network calls from then on; the rest of the batch goes
on with the same numbers it would have had, because every image depends on its own seed alone.
Encode and decode look before their single graph call, with their deadlines and the cancel keys
the worker read just before handing the batch to a compute thread. So a batch spends at most one
step (plus the time the cancel key takes to be read, CANCEL_POLL_S in the worker) on a job nobody
waits for, instead of the whole batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.sampling import Networks
from service.broker_protocol import Job, now_ms


class Abandoned(Exception):
    """Every job of the batch was abandoned: there is nothing left to compute."""


@dataclass(frozen=True)
class Drop:
    """Why and when a job left its batch: `lag_s` is the compute time it kept after being abandoned."""

    reason: str  # "expired" or "cancelled"
    lag_s: float


class BatchWatch:
    """The jobs of one batch, by position ("row"), and which of them are still wanted.

    The worker's event loop feeds cancellations in (`cancel`) while the batch computes; the compute
    thread asks `live` before each step.
    """

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._deadlines = [job.deadline_ms for job in jobs]
        self._request_ids = [job.request_id for job in jobs]
        self._cancelled_at: dict[str, int] = {}
        self._lock = threading.Lock()
        self.started_ms = now_ms()
        self.dropped: dict[int, Drop] = {}

    def start(self) -> None:
        """Compute begins now: time spent on a job before this is not compute it wasted."""
        self.started_ms = now_ms()

    def cancel(self, cancelled_at: dict[str, int]) -> None:
        """Mark requests as gone (request id → cancellation time in epoch ms, 0 when unknown)."""
        now = now_ms()
        with self._lock:
            for request_id, at in cancelled_at.items():
                self._cancelled_at.setdefault(request_id, at or now)

    def waiting_request_ids(self) -> list[str]:
        """Requests with a job still in the batch: the cancel keys worth reading."""
        with self._lock:
            return sorted(
                {rid for row, rid in enumerate(self._request_ids) if row not in self.dropped}
                - set(self._cancelled_at)
            )

    def live(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Which of `rows` are still wanted; the others are recorded in `dropped` the first time."""
        now = now_ms()
        out = np.ones(len(rows), dtype=bool)
        with self._lock:
            for i, row in enumerate(int(r) for r in rows):
                if row not in self.dropped:
                    self._check(row, now)
                out[i] = row not in self.dropped
        return out

    def _check(self, row: int, now: int) -> None:
        since = None
        if self._deadlines[row] <= now:
            reason, since = "expired", self._deadlines[row]
        elif self._request_ids[row] in self._cancelled_at:
            reason, since = "cancelled", self._cancelled_at[self._request_ids[row]]
        if since is not None:
            self.dropped[row] = Drop(reason, max(now - max(since, self.started_ms), 0) / 1000)


class PrunedGeneration:
    """The networks and decoder of one generate batch, restricted to the rows still wanted.

    While every row is wanted the calls go straight through, so answers are byte-identical to an
    unwatched batch. Once rows are abandoned, each network call runs on the others only and the
    abandoned rows get a zero velocity (their state is never read again); the decoder decodes the
    wanted rows and leaves zeros in the others. `on_step` is the sampler's hook; `wrap` binds a
    backend's networks and decoder.
    """

    def __init__(self, watch: BatchWatch, rows: Sequence[int]) -> None:
        self.inner: Networks | None = None
        self.watch = watch
        self.rows = np.asarray(rows, dtype=np.int64)
        self.keep: np.ndarray | None = None
        self._index: Any = None

    def on_step(self, _k: int) -> None:
        """Leave out the rows abandoned since the last step; Abandoned when none is left."""
        live = self.watch.live(self.rows)
        if not live.any():
            raise Abandoned
        if live.all():
            return
        keep = np.flatnonzero(live)
        if self.keep is None or len(keep) != len(self.keep):
            self.keep, self._index = keep, self.inner.asarray(keep)

    def velocity(self, x: Any, t: float, y: Any) -> Any:
        if self.keep is None:
            return self.inner.velocity(x, t, y)
        v = x * 0
        v[self._index] = self.inner.velocity(x[self._index], t, y[self._index])
        return v

    def guided(self, x: Any, t: float, y: Any, scale: float) -> Any:
        if self.keep is None:
            return self.inner.guided(x, t, y, scale)
        v = x * 0
        v[self._index] = self.inner.guided(x[self._index], t, y[self._index], scale)
        return v

    def asarray(self, values: np.ndarray) -> Any:
        return self.inner.asarray(values)

    def wrap(
        self, networks: Networks, decode: Callable[[Any], np.ndarray]
    ) -> tuple[PrunedGeneration, Callable[[Any], np.ndarray]]:
        """These networks over `networks`, and `decode` restricted to the wanted rows (checked once
        more before it runs, since no sampler step follows the last one)."""
        self.inner = networks

        def run(z: Any) -> np.ndarray:
            self.on_step(-1)
            if self.keep is None:
                return decode(z)
            images = decode(z[self._index])
            out = np.zeros((len(self.rows), *images.shape[1:]), dtype=images.dtype)
            out[self.keep] = images
            return out

        return self, run
