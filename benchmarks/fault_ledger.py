"""What the fault campaign counts: every request's outcome as its client saw it, every job as Redis
saw it, and the checks that tie the two views of one phase together."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from benchmarks.traffic import TASKS, Sample
from service.broker_protocol import GROUP, Keys

# The per-request deadline the campaign configures, and the slack past it before a request counts as
# having waited past its deadline.
REQUEST_TIMEOUT_S = 30
DEADLINE_SLACK_S = 3.0


def classify(sample: Sample) -> str:
    """The outcome of one request, from what its client saw."""
    text = sample.error.lower()
    if sample.status == 200:
        return "wrong_answer" if sample.error else "completed"
    if sample.status == 0:
        return "refused" if "connecterror" in text else "connection_lost"
    if sample.status == 429:
        return "rejected_queue_full"
    if sample.status == 503:
        if "lost in a redis failover" in text:
            return "lost_in_failover"
        return "shutdown_after_enqueue" if "shutting down" in text else "rejected_unavailable"
    if sample.status == 504:
        return "expired"
    if sample.status == 500 and "delivered" in text and "times" in text:
        return "dead_lettered"
    return "unexplained"


ENQUEUED_OUTCOMES = (
    "completed",
    "wrong_answer",
    "expired",
    "dead_lettered",
    "shutdown_after_enqueue",
    "lost_in_failover",
)


def hung(sample: Sample) -> bool:
    """No answer within the deadline and its slack: what must never happen."""
    return sample.latency_ms > (REQUEST_TIMEOUT_S + DEADLINE_SLACK_S) * 1000


def outcomes(samples: Sequence[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        kind = classify(s)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@dataclass
class Ledger:
    """Redis's own counts for one model version: jobs ever enqueued, dead-lettered, still held."""

    enqueued: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, client: redis.Redis, keys: Keys) -> Ledger:
        def added(key: str) -> int:
            try:
                return int(client.xinfo_stream(key)["entries-added"])
            except redis.ResponseError:
                return 0  # no such stream yet

        ledger = cls()
        for task in TASKS:
            ledger.enqueued[task] = added(keys.jobs(task))
            ledger.dead[task] = added(keys.dead(task))
            ledger.queued[task] = int(client.xlen(keys.jobs(task)))
            with contextlib.suppress(redis.ResponseError):
                ledger.pending[task] = int(client.xpending(keys.jobs(task), GROUP)["pending"])
        return ledger

    def minus(self, before: Ledger) -> dict[str, dict[str, int]]:
        return {
            "enqueued": {t: self.enqueued[t] - before.enqueued[t] for t in TASKS},
            "dead_lettered": {t: self.dead[t] - before.dead[t] for t in TASKS},
            "left_queued": dict(self.queued),
            "left_pending": dict(self.pending),
        }


def drain(client: redis.Redis, keys: Keys, timeout_s: float = 90.0) -> float:
    """Wait until no job is queued or pending (reclaims need CLAIM_IDLE_MS); return the seconds taken."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(redis.RedisError):
            ledger = Ledger.read(client, keys)
            if not any(ledger.queued.values()) and not any(ledger.pending.values()):
                return round(time.monotonic() - start, 1)
        time.sleep(0.25)
    return round(time.monotonic() - start, 1)


def account(
    samples: Sequence[Sample],
    before: Ledger,
    after: Ledger,
    in_doubt: Sequence[Sample] = (),
    requeued: int = 0,
    lost: int = 0,
) -> dict[str, object]:
    """Both views of one phase and the checks that tie them together.

    A job may be in Redis although its caller saw no enqueue: the connection broke after the
    request was sent (`connection_lost`), or Redis ran an enqueue and shut down before its reply
    went out, so the API answered 503 (`in_doubt`: 503s sent around the shutdown). Such a job still
    runs once Redis is back and its reply is discarded; it is counted as `queued_but_told_503`,
    and only those requests, and jobs the API enqueued again after a failover lost them
    (`requeued`), may explain a surplus of enqueued jobs. Jobs a failover lost (`lost`, as the API
    found them) never reached the new primary's count.
    """
    client = outcomes(samples)
    server = after.minus(before)
    enqueued = sum(server["enqueued"].values())
    known = sum(client.get(k, 0) for k in ENQUEUED_OUTCOMES)
    ambiguous = client.get("connection_lost", 0) + len(in_doubt)
    dead_client = client.get("dead_lettered", 0)
    dead_server = sum(server["dead_lettered"].values())
    latencies = [s.latency_ms for s in samples]
    checks = {
        "every_enqueued_job_has_an_outcome": known - lost <= enqueued <= known + ambiguous + requeued,
        "dead_letter_stream_matches_client_errors": dead_client == dead_server,
        "nothing_left_queued_or_pending": not any(server["left_queued"].values())
        and not any(server["left_pending"].values()),
        "no_answer_to_the_wrong_caller": client.get("wrong_answer", 0) == 0,
        "no_unexplained_outcome": client.get("unexplained", 0) == 0,
        "no_wait_past_the_deadline": not any(hung(s) for s in samples),
    }
    return {
        "requests": len(samples),
        "client_outcomes": client,
        "redis": server,
        "jobs_enqueued": enqueued,
        "jobs_with_known_outcome": known,
        "queued_but_told_503": max(enqueued - known - requeued, 0) if in_doubt else 0,
        "requests_in_doubt": ambiguous,
        "hung": sum(hung(s) for s in samples),
        "max_latency_ms": round(max(latencies, default=0), 1),
        "examples": {
            kind: next(s.error[:200] for s in samples if classify(s) == kind)
            for kind in client
            if kind != "completed"
        },
        "checks": checks,
        "ok": all(checks.values()),
    }


def jobs_held(client: redis.Redis, keys: Keys, pid: int) -> int:
    """Jobs delivered to the worker with this PID and not yet acknowledged (its pending entries)."""
    held = 0
    marker = f"-{pid}-"
    for task in TASKS:
        with contextlib.suppress(redis.ResponseError):
            for consumer in client.xinfo_consumers(keys.jobs(task), GROUP):
                if marker in consumer["name"].decode():
                    held += int(consumer["pending"])
    return held


def wait_until_holding(client: redis.Redis, keys: Keys, pid: int, timeout_s: float) -> None:
    """Return once the worker holds unacknowledged jobs (a batch in flight), or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and jobs_held(client, keys, pid) == 0:
        time.sleep(0.003)


def duplicates(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Replies written more than once for a job (a reclaimed job whose first worker had answered
    just before dying); each caller still got one answer, as the dispatcher keeps the first."""
    entries = unique = 0
    for key in client.scan_iter(f"{keys.prefix}:reply:*"):
        ids = [fields[b"id"] for _eid, fields in client.xrange(key)]
        entries += len(ids)
        unique += len(set(ids))
    return {"reply_entries": entries, "jobs_replied": unique, "written_twice": entries - unique}
