"""Fault campaign on the real topology: no job lost, none answered to the wrong caller.

    .venv/bin/python -m benchmarks.faults [--kill-seconds 120] [--kill-every 5] [--concurrency 16]

Three phases, each under mixed encode / decode / generate traffic whose every answer is checked
against its own request (benchmarks/service_harness.py), each a bounded loop that stops by itself:

1. `worker_sigkill`: 2 API replicas and 2 workers; every `--kill-every` seconds the longest-lived
   worker is SIGKILLed (mid-batch, whatever it holds) and a new one started, for `--kill-seconds`.
2. `redis_restart`: Redis (append-only file on, as deployed) is stopped for `--outage-seconds`
   and started again on the same port; new requests must get 503 meanwhile, readiness must drop,
   and both must recover by themselves.
3. `api_restart`: one API replica is stopped (SIGTERM: it finishes what it holds) and started again
   on the same port while clients keep sending.

After each phase the queues are drained and every job is accounted for from two sides. The
clients' view: requests = completed + dead-lettered (500 naming the deliveries) + expired (504) +
rejected (429, or 503 before enqueue) + refused (no connection) + unexplained (must be 0). Redis's
view, per task stream: `entries-added` (jobs enqueued) must equal the outcomes that imply an
enqueue, give or take the requests whose enqueue was in doubt (a connection cut mid-request, or a
503 answered while Redis shut down: its last enqueues can land with their replies unsent); the
dead-letter streams must hold exactly the dead-lettered jobs, and no job may be left queued or
pending. Writes `benchmarks/results/faults.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from benchmarks.service_harness import (
    RESULTS,
    TASKS,
    Call,
    ModelShape,
    Requests,
    Sample,
    Topology,
    closed_loop,
    drive,
    machine_info,
    metric_sum,
    resolve_model,
)
from export.repository import resolve_version_dir
from service.broker import GROUP, Keys

REQUEST_TIMEOUT_S = 30
DEADLINE_SLACK_S = 3.0
IN_DOUBT_S = 1.0
FAULT_ENV = {
    "REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "CLAIM_IDLE_MS": "3000",
    "MAX_DELIVERIES": "3",
    "REDIS_POOL_TIMEOUT_S": "2",
}


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
        return "shutdown_after_enqueue" if "shutting down" in text else "rejected_unavailable"
    if sample.status == 504:
        return "expired"
    if sample.status == 500 and "delivered" in text and "times" in text:
        return "dead_lettered"
    return "unexplained"


ENQUEUED_OUTCOMES = ("completed", "wrong_answer", "expired", "dead_lettered", "shutdown_after_enqueue")


def outcomes(samples: Sequence[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        kind = classify(s)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


class Traffic:
    """Mixed, verified requests from a background thread until stopped (or `limit_s` passes)."""

    def __init__(self, urls: Sequence[str], requests: Requests, concurrency: int, limit_s: float) -> None:
        self.urls = list(urls)
        self.requests = requests
        self.concurrency = concurrency
        self.limit_s = limit_s
        self.stop_event = threading.Event()
        self.samples: list[Sample] = []
        self.thread = threading.Thread(target=self._run, name="fault-traffic", daemon=True)

    def _make(self, n: int) -> tuple[str, Call]:
        endpoint = TASKS[n % len(TASKS)]
        return endpoint, self.requests.make(endpoint, n)

    def _run(self) -> None:
        self.samples, _ = drive(
            closed_loop(
                self.urls,
                self._make,
                self.concurrency,
                duration_s=self.limit_s,
                timeout_s=REQUEST_TIMEOUT_S + 15,
                stop=self.stop_event,
            )
        )

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def finish(self) -> list[Sample]:
        """Stop sending, wait for the requests in flight to end, and return every sample."""
        self.stop_event.set()
        self.thread.join(REQUEST_TIMEOUT_S + 30)
        if self.thread.is_alive():
            raise RuntimeError("traffic did not stop: a request outlived the client timeout")
        return self.samples

    def __exit__(self, *exc: object) -> None:
        self.finish()


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
    samples: Sequence[Sample], before: Ledger, after: Ledger, in_doubt: Sequence[Sample] = ()
) -> dict[str, object]:
    """Both views of one phase and the checks that tie them together.

    A job may be in Redis although its caller saw no enqueue: the connection broke after the
    request was sent (`connection_lost`), or Redis ran an enqueue and shut down before its reply
    went out, so the API answered 503 (`in_doubt`: 503s sent around the shutdown). Such a job still
    runs once Redis is back and its reply is discarded; it is counted as `queued_but_told_503`,
    and only those requests may explain a surplus of enqueued jobs.
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
        "every_enqueued_job_has_an_outcome": known <= enqueued <= known + ambiguous,
        "dead_letter_stream_matches_client_errors": dead_client == dead_server,
        "nothing_left_queued_or_pending": not any(server["left_queued"].values())
        and not any(server["left_pending"].values()),
        "no_answer_to_the_wrong_caller": client.get("wrong_answer", 0) == 0,
        "no_unexplained_outcome": client.get("unexplained", 0) == 0,
        "no_wait_past_the_deadline": max(latencies, default=0)
        <= (REQUEST_TIMEOUT_S + DEADLINE_SLACK_S) * 1000,
    }
    return {
        "requests": len(samples),
        "client_outcomes": client,
        "redis": server,
        "jobs_enqueued": enqueued,
        "jobs_with_known_outcome": known,
        "queued_but_told_503": max(enqueued - known, 0) if in_doubt else 0,
        "requests_in_doubt": ambiguous,
        "max_latency_ms": round(max(latencies, default=0), 1),
        "examples": {
            kind: next(s.error[:200] for s in samples if classify(s) == kind)
            for kind in client
            if kind != "completed"
        },
        "checks": checks,
        "ok": all(checks.values()),
    }


def generate_call(url: str) -> Sample:
    """One blocking generate request, as a Sample (for probes outside the closed-loop traffic)."""
    asked, start = time.time(), time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/generate", json={"class_label": 0, "steps": 1}, timeout=10)
    except httpx.HTTPError as exc:
        latency = (time.perf_counter() - start) * 1000
        return Sample(0, latency, None, None, f"{type(exc).__name__}: {exc}", asked, "generate")
    latency = (time.perf_counter() - start) * 1000
    error = "" if response.status_code == 200 else response.text[:300]
    return Sample(response.status_code, latency, None, None, error, asked, "generate")


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


@dataclass
class Campaign:
    topo: Topology
    requests: Requests
    keys: Keys
    concurrency: int
    log: Callable[[str], None] = print

    def client(self) -> redis.Redis:
        return self.topo.redis.client()

    def phase(self, name: str, limit_s: float, fault: Callable[[Traffic], dict]) -> dict[str, object]:
        store = self.client()
        before = Ledger.read(store, self.keys)
        self.log(f"[{name}] start")
        with Traffic(self.topo.urls, self.requests, self.concurrency, limit_s) as traffic:
            details = fault(traffic)
        drained = drain(store, self.keys)
        after = Ledger.read(store, self.keys)
        in_doubt = details.pop("in_doubt", [])
        samples = traffic.samples + details.pop("extra_samples", [])
        result = {**account(samples, before, after, in_doubt), "drain_s": drained, **details}
        store.close()
        self.log(f"[{name}] {json.dumps({k: result[k] for k in ('requests', 'client_outcomes', 'ok')})}")
        return result

    def worker_sigkill(self, seconds: float, every: float) -> dict[str, object]:
        def fault(traffic: Traffic) -> dict:
            born = {i: time.monotonic() for i in range(self.topo.workers)}
            kills = held = 0
            store = self.client()
            end = time.monotonic() + seconds
            time.sleep(min(every, seconds))
            while time.monotonic() < end:
                victim = min(born, key=born.get)
                proc = self.topo.worker_procs[victim]
                if proc is not None and proc.alive():
                    wait_until_holding(store, self.keys, proc.pid, timeout_s=2.0)
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.popen.wait()
                    kills += 1
                    held += jobs_held(store, self.keys, proc.pid)
                self.topo.start_worker(victim)
                born[victim] = time.monotonic()
                time.sleep(max(0.0, min(every, end - time.monotonic())))
            traffic.finish()
            drain(store, self.keys)
            dup = duplicates(store, self.keys)
            store.close()
            return {
                "seconds": seconds,
                "kill_every_s": every,
                "workers_killed": kills,
                "jobs_held_by_killed_workers": held,
                "replies": dup,
                "reclaimed_by_live_workers": metric_sum(
                    self.topo.worker_metrics(), "pae_jobs_reclaimed_total"
                ),
            }

        return self.phase("worker_sigkill", seconds + 5, fault)

    def redis_restart(self, outage_s: float, settle_s: float = 8.0) -> dict[str, object]:
        probe_url = self.topo.urls[-1]

        def fault(traffic: Traffic) -> dict:
            probes: list[tuple[float, int]] = []
            calls: list[Sample] = []
            stop = threading.Event()

            def probe() -> None:
                """Readiness and a fresh generate call every 0.2 s, independent of the traffic
                (whose clients may all be waiting on jobs queued before the outage); the calls
                are accounted for with the traffic."""
                while not stop.is_set():
                    asked = time.time()
                    try:
                        probes.append((asked, httpx.get(f"{probe_url}/readyz", timeout=2).status_code))
                    except httpx.HTTPError:
                        probes.append((asked, 0))
                    calls.append(generate_call(probe_url))
                    time.sleep(0.2)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            time.sleep(3.0)
            down_at = time.time()
            self.topo.redis.stop()
            time.sleep(outage_s)
            self.topo.redis.start()
            up_at = time.time()
            time.sleep(settle_s)
            samples = traffic.finish()
            stop.set()
            prober.join(15)
            samples = samples + calls
            during = [s for s in samples if down_at + 0.5 < s.sent_at < up_at - 0.2]
            in_doubt = [
                s
                for s in samples
                if classify(s) == "rejected_unavailable" and abs(s.sent_at - down_at) < IN_DOUBT_S
            ]
            after = [s for s in samples if s.sent_at >= up_at and s.status == 200]
            ready_after = [t for t, status in probes if t >= up_at and status == 200]
            return {
                "in_doubt": in_doubt,
                "extra_samples": calls,
                "outage_s": round(up_at - down_at, 2),
                "requests_sent_during_outage": len(during),
                "statuses_during_outage": outcomes(during),
                "generate_calls_during_outage": sorted(
                    {c.status for c in calls if down_at + 0.5 < c.sent_at < up_at - 0.3}
                ),
                "readyz_during_outage": sorted(
                    {status for t, status in probes if down_at + 0.5 < t < up_at - 0.3}
                ),
                "first_success_after_restart_s": round(min(s.sent_at for s in after) - up_at, 2)
                if after
                else None,
                "ready_again_after_s": round(min(ready_after) - up_at, 2) if ready_after else None,
                "recovered": bool(after) and bool(ready_after),
            }

        return self.phase("redis_restart", outage_s + settle_s + 10, fault)

    def api_restart(self, settle_s: float = 6.0) -> dict[str, object]:
        def fault(traffic: Traffic) -> dict:
            time.sleep(3.0)
            old = self.topo.apis[0]
            stopped_at = time.monotonic()
            self.topo.stop_proc(old, signal.SIGTERM)
            stop_s = time.monotonic() - stopped_at
            self.topo.start_api(0, port=old.port)
            self.topo.wait_ready(120)
            back_s = time.monotonic() - stopped_at
            time.sleep(settle_s)
            traffic.finish()
            return {
                "graceful_stop_s": round(stop_s, 2),
                "replica_back_after_s": round(back_s, 2),
                "exit_code": old.popen.returncode,
            }

        return self.phase("api_restart", 180, fault)


def run_campaign(
    repository: Path,
    model: str,
    kill_seconds: float,
    kill_every: float,
    outage_s: float,
    concurrency: int,
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """All three phases on one topology; returns the per-phase accounting."""
    version = resolve_version_dir(repository, model).name
    requests = Requests(ModelShape.load(repository, model), verify=repository / model / version)
    keys = Keys.for_model(model, version)
    with Topology(repository, model, api_replicas=2, workers=2, env=dict(FAULT_ENV)) as topo:
        campaign = Campaign(topo, requests, keys, concurrency, log)
        phases = {
            "worker_sigkill": campaign.worker_sigkill(kill_seconds, kill_every),
            "redis_restart": campaign.redis_restart(outage_s),
            "api_restart": campaign.api_restart(),
        }
    return {
        "topology": {"api_replicas": 2, "workers": 2, "settings": FAULT_ENV, "redis": "appendonly yes"},
        "concurrency": concurrency,
        "phases": phases,
        "ok": all(p["ok"] for p in phases.values()) and phases["redis_restart"]["recovered"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-seconds", type=float, default=120.0)
    parser.add_argument("--kill-every", type=float, default=5.0)
    parser.add_argument("--outage-seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--repository", type=Path, help="model repository (default: as benchmarks.service_load)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    args = parser.parse_args(argv)
    machine = machine_info()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pae-bench-repo-") as scratch:
        repository, model, description = resolve_model(args.repository, Path(scratch))
        result = {
            "machine": machine,
            "model": description,
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.faults", *sys.argv[1:]]),
            **run_campaign(
                repository, model, args.kill_seconds, args.kill_every, args.outage_seconds, args.concurrency
            ),
            "wall_s": round(time.time() - started, 1),
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ok": result["ok"]}))


if __name__ == "__main__":
    main()
