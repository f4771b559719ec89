"""The direct lane: an API replica that holds the encoder and decoder computes a request itself
while it has a free slot, instead of the round trip through Redis and a worker.

Why. On a CPU these graphs gain little or nothing from batching (`benchmarks/results/peers.json`:
the encoder takes 5.6–5.7 ms of CPU per image at batch 1 and 5.9 ms at batch 16, the decoder about
1.4 ms at both), so at low concurrency the queue only adds its cost: two Redis hops, a second
process and about 2 ms per request (Server-Timing), which left the service at 0.58–0.77× a plain
single-process server at concurrency 1 (0.94–0.97× with the lane, same JSON). A replica with a free
slot now runs the job itself, on one of its lane's threads (ONNX Runtime releases the GIL), while
fewer of its requests of that task are running than the lane has slots and none of them is queued
(`service.api.jobs.open_lane`). Otherwise requests queue as before and the workers batch them: no
request overtakes one queued before it, and under load the traffic is the workers' batches. Queue
bounds and admission still apply: a full queue is a 429 whether or not a slot is free.

What it keeps and what it does not. The request's deadline and cost limit are the same (a job whose
deadline passed before its slot ran it is a 504). Nobody watches for a client that goes away during
a direct job: its one graph call cannot be stopped, and the answer to a closed connection is
dropped. A direct job never enters Redis, so it is not recovered if the replica dies mid-request;
neither is that request's connection, so the client sees the same failure as for a queued job. Generation stays on the queue:
it is long, cancelled between sampler steps by the worker, and batched with its like.

`DIRECT_SLOTS` sets the slots (0, off, is the default for `pae-api`); `pae-serve` with its embedded
Redis turns the lane on when the graphs are small (`default_slots`), since there the API and the
worker share one machine anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from pathlib import Path

from service import metrics, timing
from service.batch import compute
from service.broker_protocol import Job, Reply, now_ms
from service.errors import DeadlineExceeded, JobFailed
from service.hot_threads import HotThreads
from service.runtimes.base import Runtime
from service.settings import GRAPH_TASKS

TASKS = GRAPH_TASKS
"""The tasks the lane takes: one graph call each."""
SMALL_GRAPHS_BYTES = 256 * 1024 * 1024
"""`default_slots` turns the lane on only when encoder + decoder fit in this: a second copy of a
full-size encoder (DINOv2-L: over 1 GB) in the API process costs memory and buys nothing, since
its seconds of compute dwarf a Redis hop."""
SLOTS_PER_CORE = 16
"""`default_slots` gives each usable core this many slots. A slot is a request the lane has taken,
computing or waiting in this process for one of the lane's threads (`DirectLane`); past the slots,
requests queue in Redis for the workers. Waiting here costs less than the queue (no Redis round
trips, no second process), so the slots cover the concurrency a replica commonly sees: 16 per core
keeps concurrency 32 in the lane on 2 cores. There, against the plain server in the same run, 16
per core did 1.01x its encode and 1.24x its decode requests per second, 8 per core (the lane's 16
slots, the queue beyond them) 0.98x and 1.16x; at concurrency 8 and 16, where both stay in the
lane, they are equal (`python -m benchmarks.peers.ab --config DIRECT_SLOTS=32 --config
DIRECT_SLOTS=16 --plain --endpoints encode,decode --concurrency 1,8,16,32` →
benchmarks/results/peers_ab.json)."""


def default_slots(version_dir: Path, cores: int, concurrent_runs: bool = True) -> int:
    """The slots `pae-serve` gives its API when DIRECT_SLOTS is unset: SLOTS_PER_CORE per core for
    small graphs (one, for a runtime that takes one call at a time), none for large ones."""
    size = sum(
        p.stat().st_size for p in version_dir.glob("*.onnx*") if p.name.startswith(("encoder", "decoder"))
    )
    if size > SMALL_GRAPHS_BYTES:
        return 0
    return SLOTS_PER_CORE * cores if concurrent_runs else 1


class DirectLane:
    """Up to `slots` jobs taken at once, their graph calls run `threads` at a time, in arrival order.

    Why not a thread per slot: graph calls beyond the cores' count only take turns on them, and each
    turn evicts the other calls' activations from the caches. With a thread per slot the encoder
    took about 5.9 ms of CPU per image at concurrency 32 against 5.6 ms alone; `threads` is what
    `Settings.batch_threads` gives a worker, as many single-threaded runs as there are usable cores.
    """

    def __init__(self, runtime: Runtime, slots: int, threads: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"a direct lane needs at least one slot, got {slots}")
        self.runtime = runtime
        self.slots = slots
        self.busy = 0
        # Daemon threads: a request in flight at shutdown is finished first by uvicorn's graceful
        # shutdown, so there is nothing to close.
        self._threads = HotThreads(max(1, min(threads, slots)), "pae-direct")

    def free(self, task: str) -> bool:
        """Whether a one-job request for `task` would be computed here now."""
        return task in TASKS and self.busy < self.slots

    def try_submit(
        self, task: str, payloads: Sequence[dict[str, bytes | str | int]], deadline_ms: int
    ) -> Awaitable[list[Reply]] | None:
        """The replies' awaitable when the lane takes these jobs now, else None (queue them).

        Called on the event loop, so the check and the reservation of slots are one step. A request
        takes as many slots as it has jobs; one that does not fit in the free slots goes to the
        queue whole, where its jobs are batched.
        """
        if task not in TASKS or not payloads or len(payloads) > self.slots - self.busy:
            return None
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.busy += len(payloads)
        jobs = [_job(task, i, payload, deadline_ms) for i, payload in enumerate(payloads)]

        def run() -> None:
            # One wake-up of the event loop per call (not one for the result and one for the slots).
            try:
                outcome: tuple[object, BaseException | None] = (compute(task, jobs, self.runtime), None)
            except BaseException as exc:
                outcome = (None, exc)
            loop.call_soon_threadsafe(self._finish, done, len(jobs), outcome)

        self._threads.submit(run)
        return self._replies(task, jobs, done)

    def _finish(self, done: asyncio.Future, count: int, outcome: tuple[object, BaseException | None]) -> None:
        """Free the slots when the thread finishes, not when the awaiting request is cancelled: the
        graph call cannot be interrupted, and its thread was busy until now."""
        self.busy -= count
        if done.cancelled():
            return
        result, error = outcome
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    async def _replies(self, task: str, jobs: list[Job], done: asyncio.Future) -> list[Reply]:
        timing.mark("enqueue")
        replies, elapsed = await done
        metrics.child(metrics.DIRECT_JOBS, task).inc(len(jobs))
        metrics.child(metrics.QUEUE_WAIT, task).observe(0.0)
        metrics.child(metrics.COMPUTE, task).observe(elapsed)
        metrics.child(metrics.BATCH_SIZE, task).observe(len(jobs))
        timing.mark("wait")
        out = []
        for reply in replies:
            if reply is None:
                metrics.EXPIRED.labels(task).inc()
                raise DeadlineExceeded(f"the {task} request's deadline passed before its job ran")
            if not reply.ok:
                raise JobFailed(reply.error or f"{task} job failed", status=reply.status)
            out.append(reply)
        return out


def _job(task: str, index: int, payload: dict[str, bytes | str | int], deadline_ms: int) -> Job:
    """A payload as the worker would read it from the stream (`service.batch.compute` takes jobs):
    the envelope `BrokerClient.submit` adds, read back by `Job.from_entry`."""
    envelope = {
        "id": f"direct.{index}",
        "rid": "direct",
        "reply": "",
        "deadline": deadline_ms,
        "enq": now_ms(),
    }
    fields = {
        k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in {**envelope, **payload}.items()
    }
    return Job.from_entry(task, b"direct", fields)
