"""Fault campaign on the real topology: no job lost, none answered to the wrong caller.

    .venv/bin/python -m benchmarks.faults [--kill-seconds 120] [--kill-every 5] [--concurrency 16]
        [--phases worker_sigkill,redis_restart,api_restart,primary_killed]

Four phases, each under mixed encode / decode / generate traffic whose every answer is checked
against its own request (benchmarks/traffic.py), each a bounded loop that stops by itself:

1. `worker_sigkill`: 2 API replicas and 2 workers; every `--kill-every` seconds the longest-lived
   worker is SIGKILLed (mid-batch, whatever it holds) and a new one started, for `--kill-seconds`.
2. `redis_restart`: Redis (append-only file on, as deployed) is stopped for `--outage-seconds`
   and started again on the same port; new requests must get 503 meanwhile, readiness must drop,
   and both must recover by themselves.
3. `api_restart`: one API replica is stopped (SIGTERM: it finishes what it holds) and started again
   on the same port while clients keep sending.
4. `primary_killed`, on a second topology: a primary, its replica and three sentinels (the service
   reaches Redis through REDIS_SENTINELS); the primary is SIGKILLed and the sentinels promote the
   replica. Measured: time until requests succeed again, answered / failed (by status) / hung
   (must be 0), jobs computed twice, and no request waiting past its deadline.

After each phase the queues are drained and every job is accounted for from two sides. The
clients' view: requests = completed + dead-lettered (500 naming the deliveries) + expired (504) +
rejected (429, or 503 before enqueue) + refused (no connection) + lost in a failover (503 after a
job vanished and could not be enqueued again) + unexplained (must be 0). Redis's view, per task
stream: `entries-added` (jobs enqueued) must equal the outcomes that imply an enqueue, give or take
the requests whose enqueue was in doubt (a connection cut mid-request, or a 503 answered while Redis
shut down: its last enqueues can land with their replies unsent) and, after a failover, the jobs it
lost and the API enqueued again; the
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
from benchmarks.fault_traffic import Prober, Traffic
from benchmarks.machine import RESULTS, mark_quotable
from benchmarks.topology import Topology, machine_info, metric_sum, resolve_model
from benchmarks.traffic import ModelShape, Requests
from export.repository import resolve_version_dir
from service.broker_protocol import Keys
from service.launcher import LOOPBACK, signal_process, stop_process
from service.redis_topologies import SentinelGroup

IN_DOUBT_S = 1.0
FAULT_ENV = {
    "REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "CLAIM_IDLE_MS": "3000",
    "MAX_DELIVERIES": "3",
    "REDIS_POOL_TIMEOUT_S": "2",
}


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
        store.close()
        self.log(f"[{name}] start")
        with Traffic(self.topo.urls, self.requests, self.concurrency, limit_s) as traffic:
            details = fault(traffic)
        store = self.client()  # the primary now, which a failover may have changed
        drained = drain(store, self.keys)
        after = Ledger.read(store, self.keys)
        in_doubt = details.pop("in_doubt", [])
        lost = details.pop("lost", {"requeued": 0, "rolled_back": 0})
        samples = traffic.samples + details.pop("extra_samples", [])
        ledger = account(samples, before, after, in_doubt, lost["requeued"], lost["rolled_back"])
        result = {**ledger, "drain_s": drained, **details}
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
        def fault(traffic: Traffic) -> dict:
            with Prober(self.topo.urls[-1]) as prober:
                time.sleep(3.0)
                down_at = time.time()
                self.topo.redis.stop()
                time.sleep(outage_s)
                self.topo.redis.start()
                up_at = time.time()
                time.sleep(settle_s)
                samples = traffic.finish()
            calls = prober.calls
            samples = samples + calls
            during = [s for s in samples if down_at + 0.5 < s.sent_at < up_at - 0.2]
            in_doubt = [
                s
                for s in samples
                if classify(s) == "rejected_unavailable" and abs(s.sent_at - down_at) < IN_DOUBT_S
            ]
            after = [s for s in samples if s.sent_at >= up_at and s.status == 200]
            ready_again = prober.ready_again_after(up_at)
            return {
                "in_doubt": in_doubt,
                "extra_samples": calls,
                "outage_s": round(up_at - down_at, 2),
                "requests_sent_during_outage": len(during),
                "statuses_during_outage": outcomes(during),
                "generate_calls_during_outage": sorted(
                    {c.status for c in calls if down_at + 0.5 < c.sent_at < up_at - 0.3}
                ),
                "readyz_during_outage": prober.readiness_between(down_at + 0.5, up_at - 0.3),
                "first_success_after_restart_s": round(min(s.sent_at for s in after) - up_at, 2)
                if after
                else None,
                "ready_again_after_s": ready_again,
                "recovered": bool(after) and ready_again is not None,
            }

        return self.phase("redis_restart", outage_s + settle_s + 10, fault)

    def primary_killed(self, behind_s: float = 0.0, settle_s: float = 8.0) -> dict[str, object]:
        """SIGKILL the primary under load; the sentinels promote the replica (`SENTINEL_TOPOLOGY`).

        With `behind_s`, the replica falls that far behind first (`kill_primary`), so the failover
        really loses the last jobs, replies and acknowledgements.
        """
        group = self.topo.group
        if group is None:
            raise ValueError("primary_killed needs a topology with sentinels")
        computed_before = metric_sum(self.topo.worker_metrics(), "pae_batch_size_sum")
        reclaimed_before = metric_sum(self.topo.worker_metrics(), "pae_jobs_reclaimed_total")

        def fault(traffic: Traffic) -> dict:
            with Prober(self.topo.urls[-1]) as prober:
                time.sleep(3.0)
                old = group.primary_port()
                killed_at, rolled_back = kill_primary(group, self.keys, behind_s)
                group.wait_for_new_primary(old)
                promoted_at = time.time()
                time.sleep(settle_s)
                samples = traffic.finish()
            calls = prober.calls
            samples = samples + calls
            store = self.client()
            drain(store, self.keys)
            replies = duplicates(store, self.keys)
            store.close()
            texts = self.topo.api_metrics()
            lost = {
                a: int(metric_sum(texts, "pae_jobs_lost_total", action=a)) for a in ("requeued", "failed")
            }
            computed = int(metric_sum(self.topo.worker_metrics(), "pae_batch_size_sum") - computed_before)
            completed = sum(classify(s) == "completed" for s in samples)
            after = [s for s in samples if s.sent_at >= killed_at]
            succeeded = [s for s in after if classify(s) == "completed"]
            first = min(succeeded, key=lambda s: s.sent_at, default=None)
            answered = min((s.sent_at + s.latency_ms / 1000 for s in succeeded), default=None)
            return {
                "in_doubt": [
                    s
                    for s in samples
                    if classify(s) == "rejected_unavailable" and abs(s.sent_at - killed_at) < IN_DOUBT_S
                ],
                "lost": {"requeued": lost["requeued"], "rolled_back": rolled_back},
                "extra_samples": calls,
                "replica_behind_s": behind_s,
                "jobs_rolled_back_by_failover": rolled_back,
                "failover_s": round(promoted_at - killed_at, 2),
                "first_success_sent_after_kill_s": round(first.sent_at - killed_at, 2) if first else None,
                "first_answer_after_kill_s": round(answered - killed_at, 2) if answered else None,
                "ready_again_after_kill_s": prober.ready_again_after(killed_at),
                "statuses_until_success": outcomes(
                    [s for s in after if first is None or s.sent_at < first.sent_at]
                ),
                "jobs_lost_in_failover": lost,
                "jobs_computed": computed,
                "jobs_computed_twice_at_most": max(computed - completed, 0),
                "replies": replies,
                "reclaimed_by_workers": int(
                    metric_sum(self.topo.worker_metrics(), "pae_jobs_reclaimed_total") - reclaimed_before
                ),
                "recovered": first is not None,
            }

        name = "primary_killed_replica_behind" if behind_s else "primary_killed"
        return self.phase(name, behind_s + settle_s + 80, fault)

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


def kill_primary(group: SentinelGroup, keys: Keys, behind_s: float = 0.0) -> tuple[float, int]:
    """SIGKILL the primary; return when (epoch s) and how many enqueued jobs the failover will roll
    back (entries the primary had added that its replica never got).

    The primary's writes are paused for the instant it takes to count its entries before the kill.
    With `behind_s`, its replica is first stopped (SIGSTOP) and cut off (CLIENT KILL TYPE replica),
    so it cannot reconnect; the primary goes on serving for `behind_s` seconds, and the replica is
    resumed (SIGCONT) right after the kill, that far behind: what a replica lagging behind a loaded
    primary, or cut off from it by the network, loses in a failover.
    """
    old = group.primary_port()
    primary = redis.Redis(host=LOOPBACK, port=old, password=group.password, socket_timeout=5)
    replica = next(r for r in group.replicas if r.port != old)
    if behind_s:
        signal_process(replica.proc, signal.SIGSTOP)
        primary.execute_command("CLIENT", "KILL", "TYPE", "replica")
        time.sleep(behind_s)
    primary.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
    added = Ledger.read(primary, keys).enqueued
    primary.close()
    killed_at = time.time()
    stop_process(group.server_on(old).proc, signal.SIGKILL)
    if behind_s:
        signal_process(replica.proc, signal.SIGCONT)
    time.sleep(0.3)  # the replica applies what it had received; no more can come
    survivor = redis.Redis(host=LOOPBACK, port=replica.port, password=group.password, socket_timeout=5)
    kept = Ledger.read(survivor, keys).enqueued
    survivor.close()
    return killed_at, sum(added.values()) - sum(kept.values())


SENTINEL_TOPOLOGY = (
    "a primary and one replica (appendonly yes, asynchronous replication) and three sentinels "
    "(quorum 2, down-after-milliseconds 1000, failover-timeout 10000) on 127.0.0.1; API replicas and "
    "workers reach the primary through REDIS_SENTINELS"
)
PHASES = ("worker_sigkill", "redis_restart", "api_restart", "primary_killed", "primary_killed_replica_behind")
FAILOVERS = {"primary_killed": 0.0, "primary_killed_replica_behind": 2.0}
"""Failover phases and how far behind the replica is when the primary dies (seconds stopped)."""


def run_campaign(
    repository: Path,
    model: str,
    kill_seconds: float,
    kill_every: float,
    outage_s: float,
    concurrency: int,
    log: Callable[[str], None] = print,
    phases: Sequence[str] = PHASES,
) -> dict[str, object]:
    """The phases asked for: the first three on one topology with one redis-server, `primary_killed`
    on one whose Redis is a primary, a replica and three sentinels; returns the per-phase accounting."""
    version = resolve_version_dir(repository, model).name
    requests = Requests(ModelShape.load(repository, model), verify=repository / model / version)
    keys = Keys.for_model(model, version)
    results: dict[str, dict[str, object]] = {}
    single = [name for name in phases if name not in FAILOVERS]
    if single:
        with Topology(repository, model, api_replicas=2, workers=2, env=dict(FAULT_ENV)) as topo:
            campaign = Campaign(topo, requests, keys, concurrency, log)
            run = {
                "worker_sigkill": lambda: campaign.worker_sigkill(kill_seconds, kill_every),
                "redis_restart": lambda: campaign.redis_restart(outage_s),
                "api_restart": campaign.api_restart,
            }
            results.update({name: run[name]() for name in single})
    for name in (name for name in phases if name in FAILOVERS):
        with Topology(repository, model, 2, 2, env=dict(FAULT_ENV), sentinels=True) as topo:
            campaign = Campaign(topo, requests, keys, concurrency, log)
            results[name] = campaign.primary_killed(behind_s=FAILOVERS[name])
    recovered = [p["recovered"] for p in results.values() if "recovered" in p]
    return {
        "topology": {
            "api_replicas": 2,
            "workers": 2,
            "settings": FAULT_ENV,
            "redis": "appendonly yes",
            "primary_killed": SENTINEL_TOPOLOGY,
        },
        "concurrency": concurrency,
        "phases": results,
        "ok": all(p["ok"] for p in results.values()) and all(recovered),
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
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, from {', '.join(PHASES)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    args = parser.parse_args(argv)
    phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases must name some of {', '.join(PHASES)}")
    machine = machine_info()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pae-bench-repo-") as scratch:
        repository, model, description = resolve_model(args.repository, Path(scratch))
        result = {
            "machine": machine,
            "model": description,
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.faults", *sys.argv[1:]]),
            **run_campaign(
                repository,
                model,
                args.kill_seconds,
                args.kill_every,
                args.outage_seconds,
                args.concurrency,
                phases=phases,
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
