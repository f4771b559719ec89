"""The worker's side of the job broker (`service.broker_protocol` describes the layout): read batches, reclaim
a dead consumer's jobs, dead-letter, check cancellations, reply and acknowledge.

Acknowledging deletes the entry and gives its cost back to the queue's cost counter in one script,
so XLEN and the counter always describe the same jobs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence

from service.broker_protocol import (
    DEAD_MAXLEN,
    GROUP,
    REPLY_MAXLEN,
    REPLY_TTL_MS,
    Job,
    Keys,
    Reply,
    cancel_times,
    now_ms,
)
from service.broker_scripts import ACK_LUA
from service.redis_client import RedisClient

log = logging.getLogger(__name__)


class BrokerWorker:
    """A worker's side: read batches, reclaim dead consumers' jobs, dead-letter, reply and ack."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        consumer: str,
        claim_idle_ms: int,
        max_deliveries: int,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries

    async def read(self, task: str, count: int, block_ms: int | None) -> list[Job]:
        """XREADGROUP up to `count` new jobs, blocking up to `block_ms` (None: do not block)."""
        resp = await self.redis.xreadgroup(
            GROUP, self.consumer, {self.keys.jobs(task): ">"}, count=count, block=block_ms
        )
        return await self._parse(task, [entry for _stream, entries in resp or () for entry in entries])

    async def _parse(self, task: str, entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> list[Job]:
        """Jobs from stream entries; an entry lacking the job fields is logged, acknowledged and deleted."""
        jobs, bad = [], []
        for entry_id, fields in entries:
            try:
                jobs.append(Job.from_entry(task, entry_id, fields))
            except (KeyError, ValueError, TypeError, AttributeError):
                bad.append(entry_id)
        if bad:
            log.error("dropping %d malformed %s entries: %s", len(bad), task, bad)
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(self.keys.jobs(task), GROUP, *bad)
            pipe.xdel(self.keys.jobs(task), *bad)
            await pipe.execute()
        return jobs

    async def reclaim(
        self, task: str, count: int, held: Collection[bytes] = ()
    ) -> tuple[list[Job], list[Job]]:
        """XAUTOCLAIM jobs idle longer than CLAIM_IDLE_MS; return (to run, dead-lettered).

        A job whose delivery count now exceeds MAX_DELIVERIES is copied to the dead-letter stream,
        its caller gets an error reply, and it is acknowledged and deleted. Entries in `held` (jobs
        this worker is already running or about to run) are left alone: claiming them back only
        reset their idle time.
        """
        stream = self.keys.jobs(task)
        resp = await self.redis.xautoclaim(
            stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count
        )
        jobs = await self._parse(task, [(eid, f) for eid, f in resp[1] if f and eid not in held])
        if not jobs:
            return [], []
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.xpending_range(stream, GROUP, min=job.entry_id, max=job.entry_id, count=1)
        pending = await pipe.execute()
        claimed, dead = [], []
        for job, info in zip(jobs, pending, strict=True):
            if not info:
                continue  # acknowledged meanwhile by the slow consumer it was claimed from
            job.deliveries = int(info[0]["times_delivered"])
            (dead if job.deliveries > self.max_deliveries else claimed).append(job)
        if dead:
            await self._dead_letter(task, dead)
        return claimed, dead

    async def _dead_letter(self, task: str, jobs: list[Job]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            reason = (
                f"job {job.job_id} was delivered {job.deliveries} times without finishing (its worker "
                f"stopped each time; MAX_DELIVERIES={self.max_deliveries}); moved to {self.keys.dead(task)}"
            )
            dead_fields = {k: v for k, v in job.fields.items() if k != b"data"}
            dead_fields.update({b"reason": reason.encode(), b"deliveries": str(job.deliveries).encode()})
            pipe.xadd(self.keys.dead(task), dead_fields, maxlen=DEAD_MAXLEN, approximate=True)
            self._queue_reply(pipe, job, Reply(job.job_id, ok=False, status=500, error=reason))
        self._queue_expiry(pipe, jobs)
        self._queue_ack(pipe, task, jobs)
        await pipe.execute()

    async def screen(self, task: str, jobs: Sequence[Job]) -> tuple[dict[str, int], int, int]:
        """The cancelled requests among `jobs` (`cancelled`), and the task's depth and queued cost,
        in one round trip.

        Round trips, not bytes, are what a worker pays per batch on a busy machine (each one wakes
        Redis and waits to be scheduled again), so the pre-batch checks share one pipeline.
        """
        rids = sorted({job.request_id for job in jobs})
        pipe = self.redis.pipeline(transaction=False)
        if rids:
            # MGET by name: redis-py's cluster pipeline refuses its mget() helper, though keys of one
            # hash tag make it a single-node command.
            pipe.execute_command("MGET", *(self.keys.cancel(r) for r in rids))
        pipe.xlen(self.keys.jobs(task))
        pipe.get(self.keys.cost(task))
        out = await pipe.execute()
        gone = cancel_times(rids, out[0]) if rids else {}
        return gone, int(out[-2]), int(out[-1] or 0)

    async def cancelled(self, request_ids: Sequence[str]) -> dict[str, int]:
        """request id → when it was cancelled (epoch ms; 0 when the key holds no time), for those
        among `request_ids` whose cancel key is set."""
        rids = sorted(set(request_ids))
        if not rids:
            return {}
        return cancel_times(rids, await self.redis.mget([self.keys.cancel(r) for r in rids]))

    async def drop(self, task: str, jobs: Sequence[Job]) -> None:
        """Acknowledge and delete jobs without replying (expired or cancelled: nobody waits)."""
        if jobs:
            pipe = self.redis.pipeline(transaction=False)
            self._queue_ack(pipe, task, jobs)
            await pipe.execute()

    async def answer(self, task: str, jobs: Sequence[Job], replies: Sequence[Reply | None]) -> None:
        """Write each reply to its caller's reply stream (None: nobody waits, so no reply), then
        acknowledge and delete every job, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job, reply in zip(jobs, replies, strict=True):
            if reply is not None:
                self._queue_reply(pipe, job, reply)
        self._queue_expiry(pipe, [job for job, reply in zip(jobs, replies, strict=True) if reply is not None])
        self._queue_ack(pipe, task, jobs)
        await pipe.execute()

    def _queue_reply(self, pipe, job: Job, reply: Reply) -> None:
        pipe.xadd(job.reply_key, reply.to_fields(), maxlen=REPLY_MAXLEN, approximate=True)

    def _queue_expiry(self, pipe, jobs: Sequence[Job]) -> None:
        """Renew the TTL of each reply stream written to, once per stream (a batch's jobs mostly
        answer the same few API replicas)."""
        for key in {job.reply_key for job in jobs}:
            pipe.pexpire(key, REPLY_TTL_MS)

    def _queue_ack(self, pipe, task: str, jobs: Sequence[Job]) -> None:
        pairs: list[bytes | int] = []
        for job in jobs:
            pairs.extend((job.entry_id, job.cost))
        pipe.eval(ACK_LUA, 2, self.keys.jobs(task), self.keys.cost(task), GROUP, *pairs)

    async def depth(self, task: str) -> int:
        """Jobs queued or in flight for `task` (acknowledged entries are deleted)."""
        return int(await self.redis.xlen(self.keys.jobs(task)))

    async def heartbeat(self, worker_id: str, info: dict[str, object], ttl_ms: int) -> None:
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(worker_id), json.dumps(info), px=ttl_ms)
        pipe.zadd(self.keys.workers, {worker_id: now})
        pipe.zremrangebyscore(self.keys.workers, "-inf", now - 10 * ttl_ms)
        await pipe.execute()

    async def deregister(self, worker_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.worker(worker_id))
        pipe.zrem(self.keys.workers, worker_id)
        await pipe.execute()
