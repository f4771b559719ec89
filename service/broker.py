"""The API replica's side of the job broker: enqueue a request's jobs, wait for their replies, cancel
what is abandoned, and recover jobs a Redis failover lost (`service.broker_protocol` has the keys).

Lost jobs. Redis replicates asynchronously, so a failover (or a Redis restarted without its data)
can lose the last writes before it: a job's stream entry, or a worker's reply. Nothing would ever
answer such a job, and its request would wait for its whole deadline. So every AUDIT_INTERVAL_S
the replica checks the jobs it has waited on for AUDIT_AFTER_S or more, in one script per task:
a job whose stream entry is gone was either answered (the worker writes the reply before it deletes
the entry), dead-lettered (likewise), or lost. Once the reply dispatcher has read the reply stream as
far as it reached when the entry was found gone, a job still without a reply is lost.

A lost job is enqueued again, under the same job id and deadline, rather than answered with an
error, because a job is a pure function of its payload (seeded noise, fixed weights): running it
twice gives the same answer, and the dispatcher keeps whichever reply comes first. The replica still
holds the payload and the client's deadline still bounds the wait, whereas a 503 would make every
client upload, decode and queue again for a fault that was the service's. When it cannot be enqueued
again (Redis unreachable, the queue full, or the job lost MAX_REQUEUES times already) the request
ends at once with a 503 and Retry-After that says so: a clear, retryable error, not a wait until
the deadline.

The reply stream itself can lose entries that the dispatcher had read, and a new primary on
another host (another clock) can then give new replies ids below the dispatcher's position, which
it would never read. The same check sees the stream's newest id fall below that position and makes
the dispatcher read the stream again from its start (repeats are ignored).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from service import metrics, timing
from service.broker_protocol import CANCEL_GRACE_MS, GROUP, Keys, Reply, ensure_groups, entry_order, now_ms
from service.broker_scripts import AUDIT_LUA, ENQUEUE_LUA
from service.errors import DeadlineExceeded, JobFailed, QueueFull, Unavailable
from service.redis_client import RedisClient

log = logging.getLogger(__name__)

DISPATCH_BLOCK_MS = 1000
FULL_MEMORY_S = 0.05
"""How long a replica refuses a task's requests without asking Redis after it saw the queue full.
Under a burst that turns most 429s into a dictionary lookup; a queue that frees room meanwhile
costs a few needless 429s, whose Retry-After is a second anyway."""
ROOM_MEMORY_S = 0.05
"""How long a replica admits a task's requests without asking Redis after it saw the queue at most
half full (every enqueue reports the queue it left): under steady traffic the early check then costs
no round trip. A queue that fills from half to full meanwhile is still refused exactly by the
enqueue script, only after the body was read."""
AUDIT_INTERVAL_S = 1.0
AUDIT_AFTER_S = 1.0
"""A job is checked once it has waited this long, and again each time it has waited as long since
its last check: most requests finish sooner and cost no check at all."""
MAX_REQUEUES = 3
SYNC_TIMEOUT_S = 2.0
"""How long a check waits for the dispatcher to read the replies that may explain a vanished entry;
past it (the dispatcher cannot reach Redis) nothing is declared lost until the next check."""


@dataclass
class Waiting:
    """A job this replica waits on, with what it takes to enqueue it again."""

    task: str
    future: asyncio.Future[Reply]
    fields: list[bytes | str | int]
    cost: int
    deadline_ms: int
    entry_id: bytes = b""
    checked: float = 0.0
    requeues: int = 0


class BrokerClient:
    """The API replica's side: enqueue jobs, wait for their replies, cancel what is abandoned."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        queue_max_len: int,
        replica_id: str | None = None,
        queue_max_cost: int = 1 << 62,
        audit_interval_s: float = AUDIT_INTERVAL_S,
        audit_after_s: float = AUDIT_AFTER_S,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_max_len = queue_max_len
        self.queue_max_cost = queue_max_cost
        self.audit_interval_s = audit_interval_s
        self.audit_after_s = audit_after_s
        self._full: dict[str, tuple[float, str]] = {}
        self._room: dict[str, float] = {}
        self.replica_id = replica_id or uuid.uuid4().hex
        self.reply_key = keys.reply(self.replica_id)
        self._waiting: dict[str, Waiting] = {}
        self._queued: dict[str, int] = {}
        self._enqueue = redis.register_script(ENQUEUE_LUA)
        self._audit = redis.register_script(AUDIT_LUA)
        self._read_to = b"0-0"
        self._reread = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, tasks: Sequence[str]) -> None:
        """Create the groups (best effort: Redis may be down at start), start the dispatcher and the
        lost-job check."""
        try:
            await ensure_groups(self.redis, self.keys, tasks)
        except RedisError as exc:
            log.warning("could not create consumer groups yet: %s", exc)
        self._tasks = [
            asyncio.create_task(self._dispatch(), name=f"reply-dispatcher-{self.replica_id}"),
            asyncio.create_task(self._check_periodically(), name=f"lost-job-check-{self.replica_id}"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for waiting in self._waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(Unavailable("the API replica is shutting down"))
        try:
            await self.redis.delete(self.reply_key)
        except RedisError:
            log.warning("could not delete reply stream %s on shutdown", self.reply_key)

    @property
    def waiting(self) -> int:
        """Jobs this replica is waiting on (a test and debugging aid)."""
        return len(self._waiting)

    def queued(self, task: str) -> int:
        """Jobs of `task` this replica has queued and still waits on (no I/O)."""
        return self._queued.get(task, 0)

    async def _dispatch(self) -> None:
        """The replica's single reader of its reply stream; resolves one future per reply."""
        backoff = 0.05
        while True:
            if self._reread:
                self._reread, self._read_to = False, b"0-0"
            try:
                resp = await self.redis.xread(
                    {self.reply_key: self._read_to}, count=512, block=DISPATCH_BLOCK_MS
                )
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("reply dispatcher: %s; retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    self._read_to = entry_id
                    try:
                        reply = Reply.from_fields(fields)
                    except (KeyError, ValueError, TypeError, AttributeError):
                        log.warning("reply dispatcher: skipping malformed reply entry %s", entry_id)
                        continue
                    waiting = self._waiting.get(reply.job_id)
                    if waiting is not None and not waiting.future.done():
                        waiting.future.set_result(reply)

    async def admit(self, task: str) -> None:
        """Raise QueueFull when the task's queue has no room for even the cheapest job.

        Made before a request's body is read: under a burst the refusal must not wait for an
        upload, JSON parsing or image decoding it would throw away. One round trip, or none while
        the queue was seen full in the last FULL_MEMORY_S (a 429) or at most half full in the last
        ROOM_MEMORY_S (admitted). The enqueue script stays the exact check; this one only answers
        early when the answer is already known.
        """
        refusal = self.refusal(task)
        if refusal is not None:
            raise QueueFull(refusal)
        if time.monotonic() < self._room.get(task, 0.0):
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.jobs(task))
        pipe.get(self.keys.cost(task))
        try:
            length, cost = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"the job queue (Redis) is unavailable: {exc}") from None
        cost = int(cost or 0) if length else 0
        if length >= self.queue_max_len or cost >= self.queue_max_cost:
            raise QueueFull(self._remember_full(task, int(length), cost))
        self._remember_room(task, int(length), cost)

    def refusal(self, task: str) -> str | None:
        """Why the task's queue is full, if it was seen full in the last FULL_MEMORY_S (no I/O)."""
        until, message = self._full.get(task, (0.0, ""))
        return message if time.monotonic() < until else None

    def _remember_room(self, task: str, length: int, cost: int) -> None:
        if 2 * length <= self.queue_max_len and 2 * cost <= self.queue_max_cost:
            self._room[task] = time.monotonic() + ROOM_MEMORY_S
        else:
            self._room.pop(task, None)

    def _remember_full(self, task: str, length: int, cost: int) -> str:
        message = self._full_message(task, length, cost)
        self._full[task] = (time.monotonic() + FULL_MEMORY_S, message)
        return message

    def _full_message(self, task: str, length: int, cost: int, jobs: int = 0, adds: int = 0) -> str:
        asked = f"; this request adds {jobs} jobs costing {adds}" if jobs else ""
        return (
            f"the {task} queue is full ({length} jobs costing {cost} queued; QUEUE_MAX_LEN="
            f"{self.queue_max_len}, QUEUE_MAX_COST={self.queue_max_cost}{asked}); retry later"
        )

    async def _enqueue_jobs(self, task: str, jobs: Sequence[Waiting]) -> None:
        """Add `jobs` to the task's stream, all or none, and record their entry ids.

        Raises QueueFull when a bound would be passed and Unavailable when Redis cannot be reached.
        """
        total = sum(job.cost for job in jobs)
        args: list[bytes | str | int] = [self.queue_max_len, self.queue_max_cost, len(jobs), total]
        for job in jobs:
            args.extend(job.fields)
        try:
            result = await self._enqueue(keys=[self.keys.jobs(task), self.keys.cost(task)], args=args)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"the job queue (Redis) is unavailable: {exc}") from None
        if int(result[0]) == 0:
            length, cost = int(result[1]), int(result[2])
            if length >= self.queue_max_len or cost >= self.queue_max_cost:
                self._remember_full(task, length, cost)
            raise QueueFull(self._full_message(task, length, cost, len(jobs), total))
        self._remember_room(task, int(result[1]), int(result[2]))
        checked = time.monotonic()
        for job, entry_id in zip(jobs, result[3:], strict=True):
            job.entry_id, job.checked = entry_id, checked

    async def submit(
        self, task: str, payloads: Sequence[dict[str, bytes | str | int]], deadline_ms: int
    ) -> list[Reply]:
        """Enqueue one job per payload (all or none) and return their replies in order.

        A payload's `cost` field (default 1) is what the job adds to the queue's cost.
        Raises QueueFull (a bound would be passed), Unavailable (Redis unreachable, or a job lost in
        a failover that could not be enqueued again), DeadlineExceeded (the deadline passed first:
        the jobs are cancelled) or JobFailed (a worker answered with an error). If the awaiting task
        is cancelled (client gone) the jobs are cancelled too.
        """
        request_id = uuid.uuid4().hex
        enqueued = now_ms()
        loop = asyncio.get_running_loop()
        jobs: dict[str, Waiting] = {}
        for i, payload in enumerate(payloads):
            job_id = f"{request_id}.{i}"
            fields: dict[str, bytes | str | int] = {
                "id": job_id,
                "rid": request_id,
                "reply": self.reply_key,
                "deadline": deadline_ms,
                "enq": enqueued,
                **payload,
            }
            flat: list[bytes | str | int] = [len(fields)]
            for key, value in fields.items():
                flat.extend((key, value))
            cost = int(payload.get("cost", 1))
            jobs[job_id] = Waiting(task, loop.create_future(), flat, cost, deadline_ms)
        futures = [job.future for job in jobs.values()]
        self._waiting.update(jobs)
        self._queued[task] = self._queued.get(task, 0) + len(jobs)
        try:
            await self._enqueue_jobs(task, list(jobs.values()))
            timing.mark("enqueue")
            timeout = (deadline_ms - now_ms()) / 1000
            # asyncio.wait, not wait_for(gather(...)): a gather cancelled with its caller keeps a
            # CancelledError nobody retrieves, which asyncio logs as an error with a traceback.
            # FIRST_EXCEPTION: a job that failed (lost and not enqueued again) ends the request at
            # once; its other jobs are cancelled rather than waited for.
            try:
                _done, pending = await asyncio.wait(
                    futures, timeout=max(timeout, 0.001), return_when=asyncio.FIRST_EXCEPTION
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._cancel(request_id, deadline_ms))
                raise
            failed = next((f.exception() for f in futures if f.done() and f.exception()), None)
            if failed is not None or pending:
                await self._cancel(request_id, deadline_ms)
                if failed is not None:
                    raise failed
                raise DeadlineExceeded(
                    f"the {task} request did not finish within its deadline; its jobs were cancelled"
                )
            replies = [future.result() for future in futures]
            timing.mark("wait")
        finally:
            for job_id in jobs:
                self._waiting.pop(job_id, None)
            self._queued[task] -= len(jobs)
        for reply in replies:
            if not reply.ok:
                raise JobFailed(reply.error or f"{task} job failed", status=reply.status)
        return replies

    async def _cancel(self, request_id: str, deadline_ms: int) -> None:
        now = now_ms()
        ttl = max(deadline_ms - now, 0) + CANCEL_GRACE_MS
        try:
            await self.redis.set(self.keys.cancel(request_id), now, px=ttl)
        except (RedisError, OSError) as exc:
            log.warning("could not mark request %s cancelled: %s", request_id, exc)

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.audit_interval_s)
            try:
                await self.recover_lost()
            except (RedisError, OSError) as exc:
                log.debug("lost-job check skipped: %s", exc)

    async def recover_lost(self) -> int:
        """Check the jobs waited on for AUDIT_AFTER_S or more; enqueue the lost ones again (or fail
        them with a 503). Returns how many were found lost."""
        now = time.monotonic()
        due: dict[str, list[tuple[str, Waiting]]] = {}
        for job_id, job in self._waiting.items():
            if job.entry_id and not job.future.done() and now - job.checked >= self.audit_after_s:
                due.setdefault(job.task, []).append((job_id, job))
        lost = 0
        for task, jobs in due.items():
            read_to = self._read_to
            result = await self._audit(
                keys=[self.keys.jobs(task), self.reply_key],
                args=[GROUP, *(job.entry_id for _, job in jobs)],
            )
            newest, missing = result[0], [jobs[int(i)] for i in result[1:]]
            for _, job in jobs:
                job.checked = now
            if read_to != b"0-0" and (not newest or entry_order(newest) < entry_order(read_to)):
                log.warning(
                    "reply stream %s lost entries its dispatcher had read; rereading it", self.reply_key
                )
                self._reread = True
            if not missing or not await self._dispatched_through(newest):
                continue
            gone = [job for job_id, job in missing if job_id in self._waiting and not job.future.done()]
            lost += len(gone)
            await self._requeue(task, gone)
        return lost

    async def _dispatched_through(self, entry_id: bytes) -> bool:
        """Wait until the dispatcher has read the reply stream up to `entry_id` (empty: nothing to
        read); False when it has not within SYNC_TIMEOUT_S."""
        if not entry_id:
            return True
        target = entry_order(entry_id)
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while self._reread or entry_order(self._read_to) < target:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _requeue(self, task: str, jobs: Sequence[Waiting]) -> None:
        """Enqueue lost jobs again, or fail them with a 503 saying why (see the module docstring)."""
        now = now_ms()
        again = [job for job in jobs if job.requeues < MAX_REQUEUES and job.deadline_ms > now]
        failed = [job for job in jobs if job.requeues >= MAX_REQUEUES]
        reason = f"lost in a Redis failover {MAX_REQUEUES + 1} times"
        if again:
            try:
                await self._enqueue_jobs(task, again)
            except (QueueFull, Unavailable) as exc:
                failed += again
                reason = f"lost in a Redis failover and could not be enqueued again ({exc.message})"
            else:
                for job in again:
                    job.requeues += 1
                metrics.LOST.labels(task, "requeued").inc(len(again))
                log.warning("%d %s jobs lost in a Redis failover were enqueued again", len(again), task)
        for job in failed:
            if not job.future.done():
                job.future.set_exception(Unavailable(f"a {task} job was {reason}; retry the request"))
        if failed:
            metrics.LOST.labels(task, "failed").inc(len(failed))

    async def alive_workers(self, ttl_ms: int) -> list[dict[str, object]]:
        """Info of workers whose heartbeat is younger than `ttl_ms`."""
        ids = await self.redis.zrangebyscore(self.keys.workers, now_ms() - ttl_ms, "+inf")
        if not ids:
            return []
        infos = await self.redis.mget([self.keys.worker(i.decode()) for i in ids])
        return [json.loads(raw) for raw in infos if raw]
