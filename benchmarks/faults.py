"""Fault campaign on the real topology: no job lost, none answered to the wrong caller.

    .venv/bin/python -m benchmarks.faults [--kill-seconds 120] [--kill-every 5] [--concurrency 16]

Three phases, each under mixed encode / decode / generate traffic whose every answer is checked
against its own request (benchmarks/traffic.py), each a bounded loop that stops by itself:

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
pending (benchmarks/fault_ledger.py). Writes `benchmarks/results/faults.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from benchmarks.fault_ledger import (
    REQUEST_TIMEOUT_S,
    Ledger,
    account,
    classify,
    drain,
    duplicates,
    jobs_held,
    outcomes,
    wait_until_holding,
)
from benchmarks.machine import RESULTS, mark_quotable
from benchmarks.topology import Topology, machine_info, metric_sum, resolve_model
from benchmarks.traffic import TASKS, Call, ModelShape, Requests, Sample, closed_loop, drive
from export.repository import resolve_version_dir
from service.broker_protocol import Keys
from service.launcher import stop_process

IN_DOUBT_S = 1.0
FAULT_ENV = {
    "REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "CLAIM_IDLE_MS": "3000",
    "MAX_DELIVERIES": "3",
    "REDIS_POOL_TIMEOUT_S": "2",
}


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


@dataclass
class Campaign:
    topo: Topology
    requests: Requests
    keys: Keys
    concurrency: int
    log: Callable[[str], None] = print

    def client(self) -> redis.Redis:
        return self.topo.redis_client()

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
                    wait_until_holding(store, self.keys, proc.program_pid, timeout_s=2.0)
                    stop_process(proc, signal.SIGKILL)
                    kills += 1
                    held += jobs_held(store, self.keys, proc.program_pid)
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
            stop_process(old, signal.SIGTERM, grace_s=20.0)
            stop_s = time.monotonic() - stopped_at
            self.topo.start_api(0, port=old.port)
            self.topo.wait_ready(120)
            back_s = time.monotonic() - stopped_at
            time.sleep(settle_s)
            traffic.finish()
            return {
                "graceful_stop_s": round(stop_s, 2),
                "replica_back_after_s": round(back_s, 2),
                "exit_code": old.returncode,
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
    result = mark_quotable(result, affects="its timings (the outcome accounting does not depend on load)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ok": result["ok"]}))


if __name__ == "__main__":
    main()
