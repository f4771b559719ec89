"""The measurement loop: every endpoint at every concurrency on each server, repeated with the order
reversed each time, and the graphs' compute ceiling measured in every repetition. The service and
the plain server run side by side and take turns point by point; Ray Serve runs alone (`TOGETHER`)."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers.client import Sample, Workload, closed_loop, percentile
from benchmarks.peers.servers import Running, graph_ceiling, start_server
from benchmarks.traffic import drive

WARMUP_S = 2.0
WARMUP_CONCURRENCY = 8


@dataclass(frozen=True)
class Plan:
    servers: Sequence[str]
    endpoints: Sequence[str]
    concurrency: Sequence[int]
    duration_s: float
    repetitions: int
    threads: int
    batch: int
    ceiling_s: float = 1.5
    profile: bool = False


def point_summary(
    samples: Sequence[Sample], elapsed: float, server_cpu: dict[str, float], client_cpu: float
) -> dict:
    """Verified answers per second, latency percentiles, errors, CPU, and the service's stages."""
    ok = [s for s in samples if s.ok]
    latencies = [s.latency_ms for s in ok]
    statuses: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            key = str(s.status) if s.status else "connection"
            statuses[key] = statuses.get(key, 0) + 1
    n = max(len(samples), 1)
    total_cpu = sum(server_cpu.values())
    summary: dict[str, object] = {
        "requests": len(samples),
        "rps": round(len(ok) / elapsed, 2),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "errors": len(samples) - len(ok),
        "error_statuses": statuses,
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
        "server_cores": round(total_cpu / elapsed, 3),
        "server_cpu_ms_per_request": round(1000 * total_cpu / n, 3),
        "server_cpu_ms_per_request_by_process": {
            name: round(1000 * seconds / n, 3) for name, seconds in sorted(server_cpu.items()) if seconds > 0
        },
        "client_cpu_ms_per_request": round(1000 * client_cpu / n, 3),
    }
    computes = [s.compute_ms for s in ok if s.compute_ms is not None]
    if computes:
        summary["p50_compute_ms"] = round(statistics.median(computes), 3)
        summary["p50_overhead_ms"] = round(statistics.median(s.latency_ms - s.compute_ms for s in ok), 3)
    names = sorted({name for s in ok for name in s.stages})
    if names:
        summary["stages_p50_ms"] = {
            name: round(statistics.median(s.stages.get(name, 0.0) for s in ok), 3) for name in names
        }
        summary["stages_p50_ms"]["outside_app"] = round(
            statistics.median(s.latency_ms - s.stages.get("app", 0.0) for s in ok), 3
        )
    return summary


def measure(server: Running, workload: Workload, endpoint: str, concurrency: int, seconds: float) -> dict:
    cpu_before, client_before = server.cpu_seconds(), sum(os.times()[:2])
    samples, elapsed = drive(closed_loop(workload, endpoint, server.port, concurrency, seconds))
    cpu_after = server.cpu_seconds()
    server_cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    client_cpu = sum(os.times()[:2]) - client_before
    return point_summary(samples, elapsed, server_cpu, client_cpu)


def profile_point(
    server: Running, workload: Workload, endpoint: str, concurrency: int, seconds: float
) -> dict:
    """A separate run of one point with py-spy on the server's Python processes (sampling slows
    what it samples, so the measured points never carry it): each process's samples by stage."""
    from benchmarks.peers.profile import Profiler

    profiler = Profiler(server.python_processes(), seconds)
    drive(closed_loop(workload, endpoint, server.port, concurrency, seconds))
    return {"concurrency": concurrency, "percent_of_gil_samples": profiler.stages()}


TOGETHER: tuple[str, ...] = ("service", "plain")
"""Servers that idle at under 2 % of a core (service 13 ms of CPU per second, plain 4 ms): they run
side by side and take turns point by point, so a drift of the VM's speed during a repetition (runs
here have seen 10 % between its start and its end) falls on both alike. Ray Serve's idle processes
take 100 ms of CPU per second (GCS, raylet, controller, dashboard), enough to slow whoever shares the
machine with it, so it runs alone."""


def run_sweep(
    plan: Plan, version_dir: Path, workload: Workload, log: Callable[[str], None] = print
) -> tuple[dict, list[dict], dict]:
    """runs[server][endpoint][c] = one summary per repetition; the ceiling of each repetition; and,
    with `plan.profile`, profiles[server][endpoint] from the first repetition."""
    runs: dict[str, dict] = {
        s: {e: {str(c): [] for c in plan.concurrency} for e in plan.endpoints} for s in plan.servers
    }
    ceilings = []
    profiles: dict[str, dict] = {}
    together = [s for s in plan.servers if s in TOGETHER]
    groups = ([together] if together else []) + [[s] for s in plan.servers if s not in TOGETHER]
    with tempfile.TemporaryDirectory(prefix="pae-peers-") as logs:
        for rep in range(plan.repetitions):
            ceiling = graph_ceiling(version_dir, plan.threads, plan.batch, plan.ceiling_s)
            ceilings.append(ceiling)
            log(f"rep {rep + 1}: ceiling {ceiling}")
            for group in groups if rep % 2 == 0 else reversed(groups):
                servers: list[Running] = []
                try:
                    for name in group:
                        servers.append(
                            start_server(name, version_dir, plan.threads, Path(logs) / f"rep{rep}")
                        )
                    _measure_group(plan, rep, servers, workload, runs, profiles, log)
                finally:
                    for server in servers:
                        server.stop()
    return runs, ceilings, profiles


def _measure_group(
    plan: Plan,
    rep: int,
    servers: Sequence[Running],
    workload: Workload,
    runs: dict,
    profiles: dict,
    log: Callable[[str], None],
) -> None:
    """Every endpoint and concurrency on each of `servers` in turn, the order alternating from one
    point to the next (and between repetitions)."""
    point_index = rep
    for endpoint in plan.endpoints:
        for server in servers:
            drive(closed_loop(workload, endpoint, server.port, WARMUP_CONCURRENCY, WARMUP_S))
        for c in plan.concurrency:
            order = list(servers) if point_index % 2 == 0 else list(reversed(servers))
            point_index += 1
            for server in order:
                point = measure(server, workload, endpoint, c, plan.duration_s)
                point["load_average"] = round(os.getloadavg()[0], 2)
                runs[server.name][endpoint][str(c)].append(point)
                log(
                    f"rep {rep + 1} {server.name:8s} {endpoint:7s} c={c:<3d} {point['rps']:8.1f} req/s "
                    f"p50 {point['p50_ms']} ms, server {point['server_cores']} cores, "
                    f"errors {point['errors']}"
                )
        if plan.profile and rep == 0:
            top = max(plan.concurrency)
            for server in servers:
                found = profile_point(server, workload, endpoint, top, plan.duration_s)
                profiles.setdefault(server.name, {})[endpoint] = found
                log(f"profile {server.name} {endpoint} c={top}: {found['percent_of_gil_samples']}")
