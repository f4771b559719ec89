"""Prometheus metrics with the exact names of the "Service metrics" contract (docs/INTERFACES.md).

Multiprocess-safe: when `PROMETHEUS_MULTIPROC_DIR` is set before this module is imported (the CLI
does so for several uvicorn workers) every process writes its samples to files there and
`render()` merges them, so counts and histograms are correct whichever process answers a scrape.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector


@functools.cache
def child(metric: Counter | Gauge | Histogram, *labels: str) -> Counter | Gauge | Histogram:
    """`metric.labels(*labels)`, looked up once per label set: prometheus_client validates the
    values and takes a lock on every `labels()` call (about 3 µs here), and a request made eight of
    them. For the request path's fixed label sets (endpoints, tasks, status codes), never for
    anything a client chooses."""
    return metric.labels(*labels)


ENDPOINTS: tuple[str, ...] = ("encode", "decode", "generate", "models", "healthz", "readyz")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

REQUESTS = Counter("pae_requests_total", "HTTP requests answered", ["endpoint", "status"])
REQUEST_DURATION = Histogram(
    "pae_request_duration_seconds",
    "HTTP request latency, arrival to response",
    ["endpoint", "status"],
    buckets=_LATENCY_BUCKETS,
)
INFLIGHT = Gauge(
    "pae_inflight_requests", "HTTP requests being handled", ["endpoint"], multiprocess_mode="livesum"
)
QUEUE_WAIT = Histogram(
    "pae_queue_wait_seconds",
    "Time a job waited in the queue before its batch ran",
    ["task"],
    buckets=_LATENCY_BUCKETS,
)
COMPUTE = Histogram("pae_compute_seconds", "Runtime time per batch", ["task"], buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram(
    "pae_batch_size", "Jobs per batch run by a worker or the direct lane", ["task"], buckets=_BATCH_BUCKETS
)
DIRECT_JOBS = Counter(
    "pae_direct_jobs_total",
    "Jobs an API replica computed itself in a free direct-lane slot instead of queueing them",
    ["task"],
)
QUEUE_DEPTH = Gauge(
    "pae_queue_depth",
    "Jobs queued or in flight (sampled each worker loop)",
    ["task"],
    multiprocess_mode="mostrecent",
)
RECLAIMED = Counter(
    "pae_jobs_reclaimed_total", "Jobs taken over from a consumer idle past CLAIM_IDLE_MS", ["task"]
)
DEAD_LETTERED = Counter(
    "pae_jobs_dead_lettered_total", "Jobs moved to the dead-letter stream after MAX_DELIVERIES", ["task"]
)
QUEUE_COST = Gauge(
    "pae_queue_cost",
    "Summed cost of the jobs queued or in flight (network evaluations; sampled each worker loop)",
    ["task"],
    multiprocess_mode="mostrecent",
)
EXPIRED = Counter(
    "pae_jobs_expired_total",
    "Jobs dropped because their deadline had passed, before their batch ran or between its steps",
    ["task"],
)
CANCELLED = Counter(
    "pae_jobs_cancelled_total",
    "Jobs dropped because their client went away, before their batch ran or between its steps",
    ["task"],
)
ABANDONED_COMPUTE = Histogram(
    "pae_abandoned_compute_seconds",
    "Compute a running batch spent on a job after its deadline passed or its client went away",
    ["task"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
REJECTED = Counter(
    "pae_jobs_rejected_total",
    "Requests refused before queueing (queue_full: a queue bound; too_costly: MAX_REQUEST_COST)",
    ["task", "reason"],
)
LOST = Counter(
    "pae_jobs_lost_total",
    "Jobs whose stream entry vanished with no reply (a Redis failover lost the write), by what the API "
    "did: requeued (enqueued again, same id and deadline) or failed (answered 503)",
    ["task", "action"],
)
SLOW_CLIENTS = Counter(
    "pae_slow_clients_total",
    "Connections closed because a request's headers or body did not arrive in time",
    ["phase"],
)
MODEL_INFO = Gauge(
    "pae_model_info",
    "The served model version and runtime (value 1)",
    ["model", "version", "runtime", "provider"],
    multiprocess_mode="max",
)


def registry() -> CollectorRegistry:
    """The registry to expose: a merged multiprocess view when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return merged
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(registry()), CONTENT_TYPE_LATEST
