"""The worker: pull batches from the task streams, run the runtime, reply, acknowledge.

One asyncio loop per task reads up to `MAX_BATCH_SIZE_<TASK>` jobs. A batch waits for company only
while there is nothing better to do: when every compute thread is busy and traffic is concurrent
(the read, or the previous batch, held more than one job) it keeps filling until a compute thread
frees, for at most `MAX_WAIT_MS_<TASK>` (Triton's max queue delay). When a compute thread is idle,
the jobs in hand start at once, split over the idle threads: waiting would idle a core for company
that may not come (measured at concurrency 4 with a fixed 5 ms fill: encode at 148 req/s against
202 at concurrency 2, 0.9 of 2 cores busy), and on a CPU a bigger batch saves little per image
(the encoder's batch-16 rate is within 3 % of its batch-1 rate). Under load batches still form:
the next batch is read, filled and screened while the others compute, so Redis round trips and the
fill do not idle the compute (one batch in hand per compute thread, plus the one being read: more
would only hold jobs another worker could run). Before running
a batch it drops jobs whose deadline has passed or whose request was cancelled, and while a batch
runs it keeps reading the cancel keys, so a job abandoned mid-batch leaves it at the next sampler
step while the others go on (`service.cancellation`). Compute runs on a pool of `COMPUTE_THREADS`
threads shared by all tasks (by default one, or one per core for single-threaded ONNX Runtime
sessions on CPU: `Settings.batch_threads`) while the event loop keeps heartbeats, cancellation checks
and Redis I/O going. Jobs left pending by a dead worker are taken over with XAUTOCLAIM; SIGTERM stops reading,
finishes and answers what was read, then deregisters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from redis.exceptions import RedisError

from service import metrics
from service.batch import compute, group_jobs
from service.broker_protocol import Job, Keys, Reply, ensure_groups, now_ms
from service.broker_worker import BrokerWorker
from service.cancellation import BatchWatch
from service.graph_batch import graph_batches
from service.redis_client import describe, open_redis
from service.runtimes.base import Runtime
from service.settings import TASKS, Settings

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_MS = 5_000
POLL_MS = 250
FILL_POLL_S = 0.001
FRESH_MS = 5
"""A batch whose jobs were all queued less than this long ago computes while its cancel keys are
read, instead of after: at low concurrency that round trip would sit in front of every request, and
a client that goes away within milliseconds of sending is rare. What the read finds still applies:
the job leaves the batch before its graph call or next sampler step if the answer comes in time, and
gets no reply otherwise. Older jobs, the ones a full queue holds, are screened before they compute."""
CANCEL_POLL_S = 0.01
"""How often a running batch's cancel keys are read. Reading them continuously, not once per step,
lets the next step see a cancellation however long the steps are: read after each step instead, a
cancellation landing just after a read would wait a step to be seen and run a second one."""


def split(jobs: list[Job], parts: int) -> list[list[Job]]:
    """`jobs` in at most `parts` (at least one) runs of arrival order, as even as they go."""
    parts = max(1, min(parts, len(jobs)))
    size = -(-len(jobs) // parts)
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


class Worker:
    """Serves the task streams of one model version with one runtime."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        tasks: Sequence[str] = TASKS,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.tasks = tuple(tasks)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = Keys.for_model(runtime.config.name, runtime.config.version)
        self._stopping = threading.Event()
        self._held: dict[str, set[bytes]] = {task: set() for task in self.tasks}
        self._handed = 0  # batches handed to the compute pool and not finished, all tasks
        self._finished = 0  # batches finished so far, all tasks: a change means a thread freed
        self.batch_threads = settings.batch_threads
        self._executor = ThreadPoolExecutor(max_workers=self.batch_threads, thread_name_prefix="pae-compute")
        self.graph_batch = graph_batches(
            runtime, self.tasks, settings.max_batch_size, settings.graph_batch_size
        )
        self.started = threading.Event()
        info = runtime.info()
        metrics.MODEL_INFO.labels(
            runtime.config.name, runtime.config.version, str(info.get("runtime")), str(info.get("provider"))
        ).set(1)

    def stop(self) -> None:
        """Ask the worker to drain and exit (within one poll interval); safe from any thread or a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve until stop(): heartbeats plus one batching loop per task."""
        async with open_redis(self.settings, max_connections=len(self.tasks) + 4) as redis:
            self.broker = BrokerWorker(
                redis, self.keys, self.worker_id, self.settings.claim_idle_ms, self.settings.max_deliveries
            )
            try:
                await self._serve()
            finally:
                self._executor.shutdown(wait=True)

    async def _serve(self) -> None:
        redis = self.broker.redis
        await self._until_ok(lambda: ensure_groups(redis, self.keys, self.tasks))
        heartbeat = asyncio.create_task(self._heartbeat())
        await self._until_ok(self._beat)
        self.started.set()
        log.info(
            "worker %s serving %s for %s (Redis: %s)",
            self.worker_id,
            ",".join(self.tasks),
            self.keys.prefix,
            describe(self.settings),
        )
        await asyncio.gather(*(self._task_loop(task) for task in self.tasks))
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        try:
            await self.broker.deregister(self.worker_id)
        except (RedisError, OSError) as exc:
            log.warning("could not deregister worker %s: %s", self.worker_id, exc)

    async def _until_ok(self, action) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                await action()
                return
            except (RedisError, OSError) as exc:
                log.warning("worker %s: Redis not reachable (%s); retrying", self.worker_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _info(self) -> dict[str, object]:
        return {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "tasks": list(self.tasks),
            "max_batch_size": {t: self.settings.max_batch_size[t] for t in self.tasks},
            "graph_batch_size": self.graph_batch,
            "compute_threads": self.batch_threads,
            **self.runtime.info(),
        }

    async def _beat(self) -> None:
        await self.broker.heartbeat(self.worker_id, self._info(), HEARTBEAT_TTL_MS)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _task_loop(self, task: str) -> None:
        max_batch = self.settings.max_batch_size[task]
        claim_every = min(self.settings.claim_idle_ms / 2000, 1.0)
        next_claim = 0.0
        backoff = 0.1
        last_batch = 0
        in_flight: set[asyncio.Task[None]] = set()
        while not self._stopping.is_set():
            try:
                jobs: list[Job] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + claim_every
                    claimed, dead = await self.broker.reclaim(task, max_batch, self._held[task])
                    metrics.RECLAIMED.labels(task).inc(len(claimed))
                    metrics.DEAD_LETTERED.labels(task).inc(len(dead))
                    jobs.extend(claimed)
                if len(jobs) < max_batch:
                    jobs.extend(
                        await self.broker.read(task, max_batch - len(jobs), None if jobs else POLL_MS)
                    )
                if jobs:
                    if self._handed >= self.batch_threads and (len(jobs) > 1 or last_batch > 1):
                        await self._fill(task, jobs, max_batch)
                    last_batch = len(jobs)
                    for part in split(jobs, self.batch_threads - self._handed):
                        self._handed += 1
                        in_flight.add(asyncio.create_task(self._hold(task, part)))
                    # One batch per compute thread in hand, and the next read meanwhile.
                    in_flight = await self._settle(task, in_flight, self.batch_threads)
                else:
                    metrics.QUEUE_DEPTH.labels(task).set(await self.broker.depth(task))
                backoff = 0.1
            except (RedisError, OSError) as exc:
                log.warning("worker %s, %s loop: Redis error %s; retrying", self.worker_id, task, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                if "NOGROUP" in str(exc):  # Redis restarted empty: recreate the stream and its group
                    await self._until_ok(lambda: ensure_groups(self.broker.redis, self.keys, [task]))
            except Exception:
                # Jobs in hand stay pending: they are reclaimed, and dead-lettered if they keep failing.
                log.exception("worker %s, %s loop: unexpected error; continuing", self.worker_id, task)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        await self._settle(task, in_flight, 0)

    async def _hold(self, task: str, jobs: list[Job]) -> None:
        """Process a batch, its entries marked as this worker's own meanwhile: with a batch waiting
        for the compute thread behind another, a job can sit pending longer than CLAIM_IDLE_MS,
        and the loop's own reclaim must not run it a second time."""
        ids = {job.entry_id for job in jobs}
        self._held[task] |= ids
        try:
            await self._process(task, jobs)
        finally:
            self._held[task] -= ids
            self._handed -= 1
            self._finished += 1

    async def _settle(
        self, task: str, batches: set[asyncio.Task[None]], keep: int
    ) -> set[asyncio.Task[None]]:
        """Wait until at most `keep` of the batches handed on are unfinished; return those.

        A batch that failed left its jobs pending (they are reclaimed, and dead-lettered if they keep
        failing), so its error is logged here and the loop goes on.
        """
        while len(batches) > keep:
            done, batches = await asyncio.wait(batches, return_when=asyncio.FIRST_COMPLETED)
            for batch in done:
                exc = batch.exception()
                if isinstance(exc, RedisError | OSError):
                    log.warning("worker %s, %s batch: Redis error %s", self.worker_id, task, exc)
                elif exc is not None:
                    log.error("worker %s, %s batch failed", self.worker_id, task, exc_info=exc)
        return batches

    async def _fill(self, task: str, jobs: list[Job], max_batch: int) -> None:
        """Read more jobs into `jobs` until it is full, a compute thread frees, or MAX_WAIT_MS passed.

        It polls with non-blocking reads rather than one `XREADGROUP BLOCK <ms>`: Redis times out
        blocked commands only on its `hz` tick (every 100 ms by default), so a 5 ms BLOCK that
        finds nothing really waits up to 100 ms (measured: BLOCK 5 returned after 106 ms).
        """
        end = time.monotonic() + self.settings.max_wait_ms[task] / 1000
        finished = self._finished
        while len(jobs) < max_batch and self._finished == finished:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(FILL_POLL_S, remaining))
            jobs.extend(await self.broker.read(task, max_batch - len(jobs), None))

    async def _process(self, task: str, jobs: list[Job]) -> None:
        now = now_ms()
        expired = [j for j in jobs if j.deadline_ms <= now]
        live = [j for j in jobs if j.deadline_ms > now]
        screening = asyncio.create_task(self._screen(task, live))
        if live and all(now - job.enqueued_ms < FRESH_MS for job in live):
            # Fresh jobs compute while their cancel keys are read: `_run_group` applies the answer.
            if expired:
                await self.broker.drop(task, expired)
                metrics.EXPIRED.labels(task).inc(len(expired))
            for group in group_jobs(task, live):
                await self._run_group(task, group, screening)
            return
        gone = await screening
        cancelled = [j for j in live if j.request_id in gone]
        live = [j for j in live if j.request_id not in gone]
        if expired or cancelled:
            await self.broker.drop(task, expired + cancelled)
            metrics.EXPIRED.labels(task).inc(len(expired))
            metrics.CANCELLED.labels(task).inc(len(cancelled))
        for group in group_jobs(task, live):
            await self._run_group(task, group)

    async def _screen(self, task: str, jobs: list[Job]) -> dict[str, int]:
        """The cancelled requests among `jobs`, with the queue gauges, in one round trip."""
        gone, depth, cost = await self.broker.screen(task, jobs)
        metrics.QUEUE_DEPTH.labels(task).set(depth)
        metrics.QUEUE_COST.labels(task).set(cost)
        return gone

    async def _run_group(
        self, task: str, jobs: list[Job], screening: asyncio.Task[dict[str, int]] | None = None
    ) -> None:
        """Compute one batch and answer it. With `screening` (its cancel keys, still being read)
        a cancellation it finds reaches the batch as soon as it is known: before the graph call or
        the next sampler step if still in time, else the finished job just gets no reply."""
        start = now_ms()
        for job in jobs:
            metrics.QUEUE_WAIT.labels(task).observe(max(start - job.enqueued_ms, 0) / 1000)
        watch = BatchWatch(jobs)
        if screening is not None:
            screening.add_done_callback(
                lambda done: (
                    watch.cancel(done.result()) if not done.cancelled() and not done.exception() else None
                )
            )
        done = asyncio.Event()
        # Only generation looks again once its batch runs (before each sampler step); encode and
        # decode look once, before their graph call, with what the pre-batch screen read and their
        # deadlines, so polling cancel keys during their compute would be round trips nobody reads.
        watcher = asyncio.create_task(self._watch_cancellations(watch, done)) if task == "generate" else None
        try:
            replies = await self._compute_isolating(task, jobs, watch)
        finally:
            # Not watcher.cancel(): redis-py can swallow a cancellation that lands inside a command.
            done.set()
            if watcher is not None:
                await asyncio.gather(watcher, return_exceptions=True)
        for drop in watch.dropped.values():
            (metrics.EXPIRED if drop.reason == "expired" else metrics.CANCELLED).labels(task).inc()
            metrics.ABANDONED_COMPUTE.labels(task).observe(drop.lag_s)
        if screening is not None:
            try:
                gone = await screening
            except (RedisError, OSError):
                gone = {}  # the computed answers still go out (`_answer` rides out an outage)
            for i, job in enumerate(jobs):
                if replies[i] is not None and job.request_id in gone:
                    replies[i] = None  # computed before its cancellation was read: nobody waits
                    metrics.CANCELLED.labels(task).inc()
        for job, reply in zip(jobs, replies, strict=True):
            if reply is not None:
                reply.queue_ms = float(max(start - job.enqueued_ms, 0))
        await self._answer(task, jobs, replies)

    async def _watch_cancellations(self, watch: BatchWatch, done: asyncio.Event) -> None:
        """Until `done`, read the batch's cancel keys every CANCEL_POLL_S, so a client that goes
        away frees the batch at the next sampler step."""
        while not done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), CANCEL_POLL_S)
            request_ids = watch.waiting_request_ids()
            if request_ids and not done.is_set():
                try:
                    watch.cancel(await self.broker.cancelled(request_ids))
                except (RedisError, OSError) as exc:
                    log.debug("cancel keys unreadable during a batch (%s); deadlines still apply", exc)

    async def _answer(self, task: str, jobs: list[Job], replies: list[Reply | None]) -> None:
        """Deliver computed replies, retrying through a Redis outage until the jobs' deadlines pass.

        Dropping finished results on a connection error would leave the jobs pending until
        CLAIM_IDLE_MS and compute them again, by then usually past their callers' deadlines. A retry
        after a write that did land only repeats the reply, which the dispatcher ignores. Past
        every deadline nobody waits: the jobs stay pending and are dropped as expired when reclaimed.
        """
        backoff = 0.05
        while True:
            try:
                await self.broker.answer(task, jobs, replies)
                return
            except (RedisError, OSError) as exc:
                if now_ms() >= max(job.deadline_ms for job in jobs):
                    log.warning(
                        "worker %s: gave up answering %d %s jobs (%s)", self.worker_id, len(jobs), task, exc
                    )
                    return
                log.warning(
                    "worker %s: answering %d %s jobs failed (%s); retrying",
                    self.worker_id,
                    len(jobs),
                    task,
                    exc,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _compute_isolating(
        self, task: str, jobs: list[Job], watch: BatchWatch | None = None
    ) -> list[Reply | None]:
        """Run the batch; if it fails, run each job alone so one bad job fails alone."""
        loop = asyncio.get_running_loop()
        try:
            replies, elapsed = await loop.run_in_executor(
                self._executor, compute, task, jobs, self.runtime, watch, self.graph_batch.get(task)
            )
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("%s job %s failed", task, jobs[0].job_id)
                return [
                    Reply(jobs[0].job_id, ok=False, status=500, error=f"{task} failed in the worker: {exc}")
                ]
            log.warning("%s batch of %d failed (%s); retrying each job alone", task, len(jobs), exc)
            out = []
            for job in jobs:
                out.extend(await self._compute_isolating(task, [job]))
            return out
        metrics.COMPUTE.labels(task).observe(elapsed)
        metrics.BATCH_SIZE.labels(task).observe(len(jobs))
        return replies
