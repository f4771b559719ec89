"""What API replicas and workers agree on: the Redis keys of a model version and the messages in them.

Layout (prefix `pae:{<model>:<version>}`, so two model versions never share a queue):

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

The braces are a Redis Cluster hash tag: only `{<model>:<version>}` is hashed, so every key of one
model version lives in one slot, on one shard. That is what lets the enqueue and acknowledge scripts
touch a stream and its cost counter atomically, a pipeline write a reply and acknowledge its job, and
MGET read many cancel keys, on a cluster as on a single Redis. Different model versions spread over
the shards; one version's queue is as big as one shard allows.

A job that runs longer than CLAIM_IDLE_MS can be claimed by a second worker and run twice; that is
harmless (a dispatcher resolves each job once and ignores a repeat reply) but wasteful, so
CLAIM_IDLE_MS must exceed the longest batch. Workers XACK and XDEL a job once its reply is
written, so XLEN is exactly the number of jobs queued or in flight, and the enqueue script bounds
that and their cost atomically. Payloads are raw bytes in stream fields (little-endian arrays,
UTF-8 text, canonical JSON for sampler settings): no pickle.

The API replica's side is `service.broker.BrokerClient`, the worker's `service.broker_worker.BrokerWorker`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ResponseError

GROUP = "workers"
REPLY_MAXLEN = 10_000
REPLY_TTL_MS = 600_000
DEAD_MAXLEN = 10_000
CANCEL_GRACE_MS = 60_000


def now_ms() -> int:
    return int(time.time() * 1000)


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id (`<ms>-<seq>`) as a tuple that sorts like the ids do in the stream."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Keys:
    """Every Redis key the broker uses, derived from one prefix."""

    prefix: str

    @classmethod
    def for_model(cls, name: str, version: str) -> Keys:
        # Model names are folder names (letters, digits, `.`, `_`, `-`: export.repository), so they
        # can hold no brace that would end the hash tag early.
        return cls(f"pae:{{{name}:{version}}}")

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
