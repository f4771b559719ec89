"""Redis Streams job broker: bounded atomic enqueue, per-replica replies, reclaim and dead-lettering.

Layout (prefix `pae:<model>:<version>`, so two model versions never share a queue):

- `<prefix>:jobs:<task>`   one stream per task, consumer group `workers`; one entry = one image
  or latent, so batch sizes and the queue bound count images, not requests.
- `<prefix>:cost:<task>`   the summed cost (`service.cost`) of the jobs in the stream: raised by
  the enqueue script, lowered by the acknowledge script, so QUEUE_MAX_COST bounds work, not entries.
- `<prefix>:dead:<task>`   dead-letter stream for jobs delivered more than `MAX_DELIVERIES` times.
- `<prefix>:reply:<replica>`  one reply stream per API replica, read by ONE dispatcher task that
  resolves the waiting futures (a stream, not a list, so a dispatcher that reconnects resumes from
  its last id and loses nothing).
- `<prefix>:cancel:<request>`  set by the API (to the time, epoch ms) when a client disconnects
  or a deadline passes; workers drop the request's jobs before running a batch, and take them out
  of a running batch at its next sampler step.
- `<prefix>:workers` (sorted set of heartbeat times) and `<prefix>:worker:<id>` (info, with TTL).

A job that runs longer than CLAIM_IDLE_MS can be claimed by a second worker and run twice; that is
harmless (a dispatcher resolves each job once and ignores a repeat reply) but wasteful, so
CLAIM_IDLE_MS must exceed the longest batch. Workers XACK and XDEL a job once its reply is
written, so XLEN is exactly the number of jobs queued or in flight, and the enqueue script bounds
that and their cost atomically. Payloads are raw bytes in stream fields (little-endian arrays,
UTF-8 text, canonical JSON for sampler settings): no pickle.

This module holds the layout, the messages and the API replica's side (`BrokerClient`); the
worker's side is `service.broker_worker.BrokerWorker`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
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
FULL_MEMORY_S = 0.05
"""How long a replica refuses a task's requests without asking Redis after it saw the queue full.
Under a burst that turns most 429s into a dictionary lookup; a queue that frees room meanwhile
costs a few needless 429s, whose Retry-After is a second anyway."""
ROOM_MEMORY_S = 0.05
"""How long a replica admits a task's requests without asking Redis after it saw the queue at most
half full (every enqueue reports the queue it left): under steady traffic the early check then costs
no round trip. A queue that fills from half to full meanwhile is still refused exactly by the
enqueue script, only after the body was read."""

# KEYS[1] = job stream, KEYS[2] = its cost counter. ARGV = max_len, max_cost, n_jobs, cost, then
# per job: n_pairs, field1, value1, ... XLEN counts queued plus in-flight jobs (workers delete
# acknowledged entries), so the checks and the XADDs in one script make both bounds exact under any
# number of concurrent API replicas. An empty stream has no cost: resetting the counter then heals
# any drift (a Redis restarted without its data, an acknowledgement lost with a dying worker).
_ENQUEUE_LUA = """
local len = redis.call('XLEN', KEYS[1])
local cost = 0
if len == 0 then
  redis.call('DEL', KEYS[2])
else
  cost = tonumber(redis.call('GET', KEYS[2]) or '0')
end
local n = tonumber(ARGV[3])
local add = tonumber(ARGV[4])
if len + n > tonumber(ARGV[1]) or cost + add > tonumber(ARGV[2]) then
  return {0, len, cost}
end
redis.call('INCRBY', KEYS[2], add)
local pos = 5
for i = 1, n do
  local pairs_n = tonumber(ARGV[pos])
  pos = pos + 1
  local args = {'XADD', KEYS[1], '*'}
  for j = 1, 2 * pairs_n do
    args[#args + 1] = ARGV[pos]
    pos = pos + 1
  end
  redis.call(unpack(args))
end
return {1, len + n, cost + add}
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

    def cost(self, task: str) -> str:
        return f"{self.prefix}:cost:{task}"

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
    cost: int = 1

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
            cost=max(int(fields.get(b"cost", b"1")), 0),
        )


def cancel_times(request_ids: Sequence[str], values: Sequence[bytes | None]) -> dict[str, int]:
    times = {}
    for rid, value in zip(request_ids, values, strict=True):
        if value is not None:
            times[rid] = int(value) if value.isdigit() else 0
    return times


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

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        queue_max_len: int,
        replica_id: str | None = None,
        queue_max_cost: int = 1 << 62,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_max_len = queue_max_len
        self.queue_max_cost = queue_max_cost
        self._full: dict[str, tuple[float, str]] = {}
        self._room: dict[str, float] = {}
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

    async def submit(
        self, task: str, payloads: Sequence[dict[str, bytes | str | int]], deadline_ms: int
    ) -> list[Reply]:
        """Enqueue one job per payload (all or none) and return their replies in order.

        A payload's `cost` field (default 1) is what the job adds to the queue's cost.
        Raises QueueFull (a bound would be passed), Unavailable (Redis unreachable),
        DeadlineExceeded (the deadline passed first: the jobs are cancelled) or JobFailed (a worker
        answered with an error). If the awaiting task is cancelled (client gone) the jobs are
        cancelled too.
        """
        request_id = uuid.uuid4().hex
        enqueued = now_ms()
        job_ids = [f"{request_id}.{i}" for i in range(len(payloads))]
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in job_ids]
        total = sum(int(payload.get("cost", 1)) for payload in payloads)
        args: list[bytes | str | int] = [self.queue_max_len, self.queue_max_cost, len(payloads), total]
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
                result = await self._enqueue(keys=[self.keys.jobs(task), self.keys.cost(task)], args=args)
            except (RedisError, OSError) as exc:
                raise Unavailable(f"the job queue (Redis) is unavailable: {exc}") from None
            if int(result[0]) == 0:
                length, cost = int(result[1]), int(result[2])
                if length >= self.queue_max_len or cost >= self.queue_max_cost:
                    self._remember_full(task, length, cost)
                raise QueueFull(self._full_message(task, length, cost, len(payloads), total))
            self._remember_room(task, int(result[1]), int(result[2]))
            timing.mark("enqueue")
            timeout = (deadline_ms - now_ms()) / 1000
            # asyncio.wait, not wait_for(gather(...)): a gather cancelled with its caller keeps a
            # CancelledError nobody retrieves, which asyncio logs as an error with a traceback.
            try:
                _done, pending = await asyncio.wait(futures, timeout=max(timeout, 0.001))
            except asyncio.CancelledError:
                await asyncio.shield(self._cancel(request_id, deadline_ms))
                raise
            if pending:
                await self._cancel(request_id, deadline_ms)
                raise DeadlineExceeded(
                    f"the {task} request did not finish within its deadline; its jobs were cancelled"
                )
            replies = [future.result() for future in futures]
            timing.mark("wait")
        finally:
            for job_id in job_ids:
                self._waiting.pop(job_id, None)
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

    async def alive_workers(self, ttl_ms: int) -> list[dict[str, object]]:
        """Info of workers whose heartbeat is younger than `ttl_ms`."""
        ids = await self.redis.zrangebyscore(self.keys.workers, now_ms() - ttl_ms, "+inf")
        if not ids:
            return []
        infos = await self.redis.mget([self.keys.worker(i.decode()) for i in ids])
        return [json.loads(raw) for raw in infos if raw]
