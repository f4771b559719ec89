"""Redis Streams job broker: bounded atomic enqueue, per-replica replies, reclaim and dead-lettering.

Layout (prefix `pae:<model>:<version>`, so two model versions never share a queue):

- `<prefix>:jobs:<task>`   one stream per task, consumer group `workers`; one entry = one image
  or latent, so batch sizes and the queue bound count images, not requests.
- `<prefix>:dead:<task>`   dead-letter stream for jobs delivered more than `MAX_DELIVERIES` times.
- `<prefix>:reply:<replica>`  one reply stream per API replica, read by ONE dispatcher task that
  resolves the waiting futures (a stream, not a list, so a dispatcher that reconnects resumes from
  its last id and loses nothing).
- `<prefix>:cancel:<request>`  set by the API when a client disconnects or a deadline passes;
  workers drop the request's jobs before running a batch.
- `<prefix>:workers` (sorted set of heartbeat times) and `<prefix>:worker:<id>` (info, with TTL).

A job that runs longer than CLAIM_IDLE_MS can be claimed by a second worker and run twice; that is
harmless (a dispatcher resolves each job once and ignores a repeat reply) but wasteful, so
CLAIM_IDLE_MS must exceed the longest batch. Workers XACK and XDEL a job once its reply is written, so XLEN is exactly the number of jobs
queued or in flight, and the enqueue script bounds that atomically. Payloads are raw bytes in
stream fields (little-endian arrays, UTF-8 text, canonical JSON for sampler settings): no pickle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from service import timing
from service.errors import DeadlineExceeded, JobFailed, QueueFull, Unavailable

log = logging.getLogger(__name__)

GROUP = "workers"
REPLY_MAXLEN = 10_000
REPLY_TTL_MS = 600_000
DEAD_MAXLEN = 10_000
CANCEL_GRACE_MS = 60_000
DISPATCH_BLOCK_MS = 1000
HEALTH_CHECK_S = 1

# KEYS[1] = job stream. ARGV = max_len, n_jobs, then per job: n_pairs, field1, value1, ...
# XLEN counts queued plus in-flight jobs (workers delete acknowledged entries), so the check and
# the XADDs in one script make the bound exact under any number of concurrent API replicas.
_ENQUEUE_LUA = """
local len = redis.call('XLEN', KEYS[1])
local n = tonumber(ARGV[2])
if len + n > tonumber(ARGV[1]) then
  return {0, len}
end
local out = {1}
local pos = 3
for i = 1, n do
  local pairs_n = tonumber(ARGV[pos])
  pos = pos + 1
  local args = {'XADD', KEYS[1], '*'}
  for j = 1, 2 * pairs_n do
    args[#args + 1] = ARGV[pos]
    pos = pos + 1
  end
  out[#out + 1] = redis.call(unpack(args))
end
return out
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def make_pool(url: str, max_connections: int, timeout_s: float) -> BlockingConnectionPool:
    """A bounded pool that waits up to `timeout_s` for a free connection instead of failing at once.

    redis-py's default pool raises MaxConnectionsError immediately past its size (measured at 200
    concurrent requests, SERVING_NOTES); blocking for a bounded time turns a burst into a short wait.

    After a Redis restart, connections that sat in the pool through the outage are dead, and each
    one failed the first request that drew it (a 503 well after Redis was back, seen in the fault
    campaign). So a connection idle for more than HEALTH_CHECK_S is PINGed before use and
    reconnected if the PING fails, and a command whose connection breaks is sent once more on a
    fresh one. A resent enqueue whose first attempt had in fact run adds its jobs twice under the
    same job ids: both run, the dispatcher keeps the first reply and ignores the repeat.
    """
    return BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=5.0,
        socket_timeout=30.0,
        health_check_interval=HEALTH_CHECK_S,
        retry=Retry(NoBackoff(), 1),
    )


@dataclass(frozen=True)
class Keys:
    """Every Redis key the broker uses, derived from one prefix."""

    prefix: str

    @classmethod
    def for_model(cls, name: str, version: str) -> Keys:
        return cls(f"pae:{name}:{version}")

    def jobs(self, task: str) -> str:
        return f"{self.prefix}:jobs:{task}"

    def dead(self, task: str) -> str:
        return f"{self.prefix}:dead:{task}"

    def reply(self, replica: str) -> str:
        return f"{self.prefix}:reply:{replica}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{request_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"


@dataclass
class Reply:
    """A worker's answer to one job."""

    job_id: str
    ok: bool
    status: int = 200
    error: str = ""
    dtype: str = ""
    shape: tuple[int, ...] = ()
    data: bytes = b""
    queue_ms: float = 0.0
    compute_ms: float = 0.0

    def to_fields(self) -> dict[str, bytes | str | int | float]:
        return {
            "id": self.job_id,
            "ok": int(self.ok),
            "status": self.status,
            "error": self.error,
            "dtype": self.dtype,
            "shape": ",".join(map(str, self.shape)),
            "data": self.data,
            "queue_ms": self.queue_ms,
            "compute_ms": self.compute_ms,
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Reply:
        shape = fields.get(b"shape", b"").decode()
        return cls(
            job_id=fields[b"id"].decode(),
            ok=fields.get(b"ok") == b"1",
            status=int(fields.get(b"status", b"500")),
            error=fields.get(b"error", b"").decode("utf-8", "replace"),
            dtype=fields.get(b"dtype", b"").decode(),
            shape=tuple(int(d) for d in shape.split(",")) if shape else (),
            data=fields.get(b"data", b""),
            queue_ms=float(fields.get(b"queue_ms", b"0")),
            compute_ms=float(fields.get(b"compute_ms", b"0")),
        )


@dataclass
class Job:
    """One queued job as a worker sees it."""

    entry_id: bytes
    task: str
    job_id: str
    request_id: str
    reply_key: str
    deadline_ms: int
    enqueued_ms: int
    fields: dict[bytes, bytes] = field(repr=False)
    deliveries: int = 1

    @classmethod
    def from_entry(cls, task: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Job:
        return cls(
            entry_id=entry_id,
            task=task,
            job_id=fields[b"id"].decode(),
            request_id=fields[b"rid"].decode(),
            reply_key=fields[b"reply"].decode(),
            deadline_ms=int(fields[b"deadline"]),
            enqueued_ms=int(fields[b"enq"]),
            fields=fields,
        )


async def ensure_groups(redis: Redis, keys: Keys, tasks: Sequence[str]) -> None:
    """Create each task's stream and consumer group if missing (id 0: jobs queued earlier count)."""
    for task in tasks:
        try:
            await redis.xgroup_create(keys.jobs(task), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


class BrokerClient:
    """The API replica's side: enqueue jobs, wait for their replies, cancel what is abandoned."""

    def __init__(self, redis: Redis, keys: Keys, queue_max_len: int, replica_id: str | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_max_len = queue_max_len
        self.replica_id = replica_id or uuid.uuid4().hex
        self.reply_key = keys.reply(self.replica_id)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._enqueue = redis.register_script(_ENQUEUE_LUA)
        self._dispatcher: asyncio.Task[None] | None = None

    async def start(self, tasks: Sequence[str]) -> None:
        """Create the groups (best effort: Redis may be down at start) and start the dispatcher."""
        try:
            await ensure_groups(self.redis, self.keys, tasks)
        except RedisError as exc:
            log.warning("could not create consumer groups yet: %s", exc)
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"reply-dispatcher-{self.replica_id}")

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(Unavailable("the API replica is shutting down"))
        try:
            await self.redis.delete(self.reply_key)
        except RedisError:
            log.warning("could not delete reply stream %s on shutdown", self.reply_key)

    @property
    def waiting(self) -> int:
        """Jobs this replica is waiting on (a test and debugging aid)."""
        return len(self._waiting)

    async def _dispatch(self) -> None:
        """The replica's single reader of its reply stream; resolves one future per reply."""
        last = b"0-0"
        backoff = 0.05
        while True:
            try:
                resp = await self.redis.xread({self.reply_key: last}, count=512, block=DISPATCH_BLOCK_MS)
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
                    last = entry_id
                    try:
                        reply = Reply.from_fields(fields)
                    except (KeyError, ValueError, TypeError, AttributeError):
                        log.warning("reply dispatcher: skipping malformed reply entry %s", entry_id)
                        continue
                    fut = self._waiting.get(reply.job_id)
                    if fut is not None and not fut.done():
                        fut.set_result(reply)

    async def submit(
        self, task: str, payloads: Sequence[dict[str, bytes | str | int]], deadline_ms: int
    ) -> list[Reply]:
        """Enqueue one job per payload (all or none) and return their replies in order.

        Raises QueueFull (the bound would be passed), Unavailable (Redis unreachable),
        DeadlineExceeded (the deadline passed first: the jobs are cancelled) or JobFailed (a worker
        answered with an error). If the awaiting task is cancelled (client gone) the jobs are
        cancelled too.
        """
        request_id = uuid.uuid4().hex
        enqueued = now_ms()
        job_ids = [f"{request_id}.{i}" for i in range(len(payloads))]
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in job_ids]
        args: list[bytes | str | int] = [self.queue_max_len, len(payloads)]
        for job_id, payload in zip(job_ids, payloads, strict=True):
            fields: dict[str, bytes | str | int] = {
                "id": job_id,
                "rid": request_id,
                "reply": self.reply_key,
                "deadline": deadline_ms,
                "enq": enqueued,
                **payload,
            }
            args.append(len(fields))
            for key, value in fields.items():
                args.extend((key, value))
        for job_id, fut in zip(job_ids, futures, strict=True):
            self._waiting[job_id] = fut
        try:
            try:
                result = await self._enqueue(keys=[self.keys.jobs(task)], args=args)
            except (RedisError, OSError) as exc:
                raise Unavailable(f"the job queue (Redis) is unavailable: {exc}") from None
            if int(result[0]) == 0:
                raise QueueFull(
                    f"the {task} queue is full ({int(result[1])} queued, QUEUE_MAX_LEN={self.queue_max_len}, "
                    f"this request adds {len(payloads)}); retry later"
                )
            timing.mark("enqueue")
            timeout = (deadline_ms - now_ms()) / 1000
            try:
                replies = await asyncio.wait_for(asyncio.gather(*futures), timeout=max(timeout, 0.001))
                timing.mark("wait")
            except asyncio.TimeoutError:
                await self._cancel(request_id, deadline_ms)
                raise DeadlineExceeded(
                    f"the {task} request did not finish within its deadline; its jobs were cancelled"
                ) from None
            except asyncio.CancelledError:
                await asyncio.shield(self._cancel(request_id, deadline_ms))
                raise
        finally:
            for job_id in job_ids:
                self._waiting.pop(job_id, None)
        for reply in replies:
            if not reply.ok:
                raise JobFailed(reply.error or f"{task} job failed", status=reply.status)
        return replies

    async def _cancel(self, request_id: str, deadline_ms: int) -> None:
        ttl = max(deadline_ms - now_ms(), 0) + CANCEL_GRACE_MS
        try:
            await self.redis.set(self.keys.cancel(request_id), b"1", px=ttl)
        except (RedisError, OSError) as exc:
            log.warning("could not mark request %s cancelled: %s", request_id, exc)

    async def alive_workers(self, ttl_ms: int) -> list[dict[str, object]]:
        """Info of workers whose heartbeat is younger than `ttl_ms`."""
        ids = await self.redis.zrangebyscore(self.keys.workers, now_ms() - ttl_ms, "+inf")
        if not ids:
            return []
        infos = await self.redis.mget([self.keys.worker(i.decode()) for i in ids])
        return [json.loads(raw) for raw in infos if raw]


class BrokerWorker:
    """A worker's side: read batches, reclaim dead consumers' jobs, dead-letter, reply and ack."""

    def __init__(
        self,
        redis: Redis,
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

    async def screen(self, task: str, jobs: Sequence[Job]) -> tuple[set[str], int]:
        """Request ids among `jobs` whose cancel key is set, and the task's depth, in one round trip.

        Round trips, not bytes, are what a worker pays per batch on a busy machine (each one wakes
        Redis and waits to be scheduled again), so the pre-batch checks share one pipeline.
        """
        rids = sorted({job.request_id for job in jobs})
        pipe = self.redis.pipeline(transaction=False)
        if rids:
            pipe.mget([self.keys.cancel(r) for r in rids])
        pipe.xlen(self.keys.jobs(task))
        out = await pipe.execute()
        gone = {rid for rid, value in zip(rids, out[0], strict=True) if value is not None} if rids else set()
        return gone, int(out[-1])

    async def drop(self, task: str, jobs: Sequence[Job]) -> None:
        """Acknowledge and delete jobs without replying (expired or cancelled: nobody waits)."""
        if jobs:
            pipe = self.redis.pipeline(transaction=False)
            self._queue_ack(pipe, task, jobs)
            await pipe.execute()

    async def answer(self, task: str, jobs: Sequence[Job], replies: Sequence[Reply]) -> None:
        """Write each reply to its caller's reply stream, then XACK and XDEL, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job, reply in zip(jobs, replies, strict=True):
            self._queue_reply(pipe, job, reply)
        self._queue_expiry(pipe, jobs)
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
        ids = [job.entry_id for job in jobs]
        pipe.xack(self.keys.jobs(task), GROUP, *ids)
        pipe.xdel(self.keys.jobs(task), *ids)

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
