"""Service load benchmark on the real topology: throughput, tail latency and overhead, batched vs not.

    .venv/bin/python -m benchmarks.service_load [--duration 8] [--concurrency 1,4,16,32,64]
        [--api-replicas 2] [--workers 1] [--memory-requests 10000]

Two topologies run side by side (benchmarks/topology.py: redis-server, `pae-serve` API
replicas, `pae-worker` workers, all on 127.0.0.1): one with the default batching, one with every
`MAX_BATCH_SIZE_<TASK>=1`. Each (endpoint, concurrency) point alternates between them in
`--rounds` slices, so background load on a shared machine hits both modes alike; an idle topology
costs next to nothing. The client keeps `c` requests in flight for `--duration` seconds and checks
every answer is its own.

Per point: verified requests per second, latency percentiles, errors by status, the mean batch size
(workers' `pae_batch_size`), and the CPU milliseconds per request each process used (API replicas,
workers, redis-server, and this client) — which is what decides whether batching can pay on a
given machine. Service overhead = end-to-end latency − the runtime's compute time (`X-Compute-Ms`,
the worker's `pae_compute_seconds` for that batch). With `--memory-requests N` a last phase sends N
mixed requests after a warm-up and reports the RSS growth of every API and worker process.

The model is `model_repository/fmnist32-tiny/<latest>` when exported, otherwise the tiny
random-weight repository of export/tiny_repository.py (the JSON's `model` says which). Writes
`benchmarks/results/service_load.json` and `service_load.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.machine import RESULTS, mark_quotable, save_figure
from benchmarks.topology import Topology, cpu_seconds, machine_info, metric_sum, resolve_model, rss_mb
from benchmarks.traffic import (
    TASKS,
    Call,
    ModelShape,
    Requests,
    Sample,
    closed_loop,
    drive,
    percentile,
    summarise,
)

MODES = ("batched", "unbatched")
MEMORY_TARGET_MB = 50
OVERLOAD_CONCURRENCY = 64
OVERLOAD_QUEUE = 32
OVERLOAD_STEPS = 50
OVERLOAD_IMAGES = 4


def mode_env(mode: str) -> dict[str, str]:
    return {f"MAX_BATCH_SIZE_{t.upper()}": "1" for t in TASKS} if mode == "unbatched" else {}


@dataclass
class Point:
    """Raw counts of one (endpoint, concurrency, mode) point, accumulated over its rounds."""

    samples: list[Sample] = field(default_factory=list)
    elapsed: float = 0.0
    jobs: float = 0.0
    batches: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def add_round(
        self, topo: Topology, requests: Requests, endpoint: str, concurrency: int, seconds: float
    ) -> None:
        pids = topo.processes()
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_before = sum(os.times()[:2])
        metrics_before = topo.worker_metrics()
        samples, elapsed = drive(
            closed_loop(topo.urls, lambda n: (endpoint, requests.make(endpoint, n)), concurrency, seconds)
        )
        metrics_after = topo.worker_metrics()
        self.cpu["client"] = self.cpu.get("client", 0.0) + sum(os.times()[:2]) - client_before
        for name, pid in pids.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds(pid) - cpu_before[name]
        for name, attr in (("pae_batch_size_sum", "jobs"), ("pae_batch_size_count", "batches")):
            delta = metric_sum(metrics_after, name, task=endpoint) - metric_sum(
                metrics_before, name, task=endpoint
            )
            setattr(self, attr, getattr(self, attr) + delta)
        self.samples += samples
        self.elapsed += elapsed

    def summary(self) -> dict[str, object]:
        point = summarise(self.samples, self.elapsed)
        point["mean_batch"] = round(self.jobs / self.batches, 2) if self.batches else None
        queue = [s.queue_ms for s in self.samples if s.queue_ms is not None]
        point["p50_queue_ms"] = round(statistics.median(queue), 1) if queue else None
        n = max(len(self.samples), 1)
        point["cpu_ms_per_request"] = {name: round(1000 * v / n, 3) for name, v in self.cpu.items()}
        return point


def overhead_stats(samples: Sequence[Sample]) -> dict[str, float | int]:
    """Latency minus compute (X-Compute-Ms), and its parts, as medians over the verified answers."""
    ok = [s for s in samples if s.status == 200 and not s.error and s.compute_ms is not None]
    return {
        "p50_ms": round(statistics.median(s.latency_ms - s.compute_ms for s in ok), 3),
        "p50_latency_ms": round(statistics.median(s.latency_ms for s in ok), 3),
        "p50_compute_ms": round(statistics.median(s.compute_ms for s in ok), 3),
        "p50_queue_ms": round(statistics.median(s.queue_ms or 0.0 for s in ok), 3),
        "samples": len(ok),
    }


def sweep(args: argparse.Namespace, repository: Path, model: str, requests: Requests) -> tuple[dict, dict]:
    """Every endpoint at every concurrency on both topologies, interleaved."""
    runs: dict[str, dict] = {e: {m: {} for m in MODES} for e in args.endpoints}
    overhead: dict[str, dict] = {m: {} for m in MODES}
    topologies = {m: Topology(repository, model, args.api_replicas, args.workers, mode_env(m)) for m in MODES}
    try:
        for topo in topologies.values():
            topo.start()
        for endpoint in args.endpoints:
            for topo in topologies.values():  # warm-up: connections, first batches, allocator
                drive(closed_loop(topo.urls, lambda n, e=endpoint: (e, requests.make(e, n)), 8, total=80))
            for c in args.concurrency:
                points = {mode: Point() for mode in MODES}
                for _round in range(args.rounds):
                    for mode, topo in topologies.items():
                        points[mode].add_round(topo, requests, endpoint, c, args.duration / args.rounds)
                for mode, point in points.items():
                    runs[endpoint][mode][str(c)] = point.summary()
                    if c == 1:
                        overhead[mode][endpoint] = overhead_stats(point.samples)
                    print(
                        f"{mode:9s} {endpoint:8s} c={c:<3d} {json.dumps(runs[endpoint][mode][str(c)])}",
                        flush=True,
                    )
    finally:
        for topo in topologies.values():
            topo.stop()
    return runs, overhead


def overload_run(args: argparse.Namespace, repository: Path, model: str, requests: Requests) -> dict:
    """Past saturation: more work in flight than the queue may hold must give 429s, nothing else.

    The sweep never fills the queue (a closed loop of c clients holds at most c jobs, fewer than
    QUEUE_MAX_LEN). Here heavy generate requests keep the workers the bottleneck and the queue
    bound is small, so the queue fills; every answer must be a verified 200 or a 429 with
    Retry-After, and none may take longer than the deadline.
    """

    def heavy(n: int) -> tuple[str, Call]:
        seed = 5_000_000 + 10 * n
        body = {"class_label": n % 2, "seed": seed, "steps": OVERLOAD_STEPS, "num_images": OVERLOAD_IMAGES}

        def own(response: httpx.Response) -> bool:
            seeds = [image["seed"] for image in response.json()["images"]]
            return seeds == list(range(seed, seed + OVERLOAD_IMAGES))

        return "generate", Call("/v1/generate", {"json": body}, own)

    env = {"QUEUE_MAX_LEN": str(OVERLOAD_QUEUE)}
    with Topology(repository, model, args.api_replicas, args.workers, env) as topo:
        samples, elapsed = drive(
            closed_loop(topo.urls, heavy, OVERLOAD_CONCURRENCY, duration_s=args.duration)
        )
    summary = summarise(samples, elapsed)
    rejected = [s for s in samples if s.status == 429]
    slowest = max(s.latency_ms for s in samples)
    return {
        "traffic": f"generate, {OVERLOAD_IMAGES} images x {OVERLOAD_STEPS} steps per request",
        "concurrency": OVERLOAD_CONCURRENCY,
        "queue_max_len": OVERLOAD_QUEUE,
        "summary": summary,
        "rejected_429": len(rejected),
        "p50_429_ms": percentile([s.latency_ms for s in rejected], 50),
        "every_429_has_retry_after": all(s.retry_after for s in rejected),
        "only_429s": set(summary["error_statuses"]) <= {"429"},
        "slowest_answer_ms": round(slowest, 1),
        "within_deadline": slowest < 30_000,
    }


def memory_run(args: argparse.Namespace, repository: Path, model: str, requests: Requests) -> dict:
    """RSS of every API and worker process before and after `--memory-requests` mixed requests."""

    def mixed(n: int) -> tuple[str, Call]:
        endpoint = TASKS[n % len(TASKS)]
        return endpoint, requests.make(endpoint, n)

    with Topology(repository, model, args.api_replicas, args.workers) as topo:
        drive(closed_loop(topo.urls, mixed, 16, total=max(600, args.memory_requests // 10)))
        procs = {name: pid for name, pid in topo.processes().items() if name != "redis"}
        before = {name: rss_mb(pid) for name, pid in procs.items()}
        start = time.perf_counter()
        samples, elapsed = drive(closed_loop(topo.urls, mixed, 16, total=args.memory_requests))
        after = {name: rss_mb(pid) for name, pid in procs.items()}
    growth = {name: round(after[name] - before[name], 2) for name in before}
    return {
        "requests": args.memory_requests,
        "warmup_requests": max(600, args.memory_requests // 10),
        "concurrency": 16,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summarise(samples, elapsed),
        "rss_before_mb": {k: round(v, 1) for k, v in before.items()},
        "rss_after_mb": {k: round(v, 1) for k, v in after.items()},
        "rss_growth_mb": growth,
        "max_growth_mb": max(growth.values()),
        "target_mb": MEMORY_TARGET_MB,
    }


def plot(result: dict, path: Path) -> None:
    """Throughput and p99 latency against concurrency, per endpoint, batched vs unbatched."""
    runs = result["runs"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 7), squeeze=False)
    for col, (endpoint, modes) in enumerate(runs.items()):
        for mode, points in modes.items():
            cs = sorted(int(c) for c in points)
            style = "-o" if mode == "batched" else "--s"
            axes[0][col].plot(cs, [points[str(c)]["rps"] for c in cs], style, label=mode)
            axes[1][col].plot(cs, [points[str(c)]["p99_ms"] for c in cs], style, label=mode)
        axes[0][col].set_title(f"/v1/{endpoint}")
        axes[0][col].set_ylabel("verified answers / s")
        axes[1][col].set_ylabel("p99 latency (ms)")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(cs, [str(c) for c in cs])
            axes[row][col].set_xlabel("concurrent requests")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend()
    machine = result["machine"]
    save_figure(fig, path, f"{result['model']} — {machine['logical_cores']} cores", result)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds per (endpoint, concurrency, mode)"
    )
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternations of the two modes per point (duration split)"
    )
    parser.add_argument("--endpoints", default=",".join(TASKS))
    parser.add_argument("--api-replicas", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--memory-requests", type=int, default=0, help="0 skips the memory phase")
    parser.add_argument("--no-overload", action="store_true", help="skip the queue-full (429) phase")
    parser.add_argument("--repository", type=Path, help="model repository (default: see the module doc)")
    parser.add_argument("--model-note", default="", help="appended to the JSON's model description")
    parser.add_argument("--out", type=Path, default=RESULTS / "service_load.json")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.endpoints = [e for e in args.endpoints.split(",") if e]
    if set(args.endpoints) - set(TASKS):
        parser.error(f"--endpoints must name {', '.join(TASKS)}")

    with tempfile.TemporaryDirectory(prefix="pae-bench-repo-") as scratch:
        result = mark_quotable(run(args, Path(scratch)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(
        json.dumps(
            {k: result[k] for k in ("overhead_ms", "batching_ratio_c32", "worker_cpu_ratio_c32")}, indent=2
        )
    )


def run(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    """The sweep (and the memory phase if asked for), as the JSON document."""
    machine = machine_info()
    started = time.time()
    repository, model, description = resolve_model(args.repository, scratch)
    requests = Requests(ModelShape.load(repository, model))
    runs, overhead = sweep(args, repository, model, requests)
    result: dict[str, object] = {
        "machine": machine,
        "model": f"{description} {args.model_note}".strip(),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.service_load", *sys.argv[1:]]),
        "topology": {
            "api_replicas": args.api_replicas,
            "workers": args.workers,
            "redis": "redis-server on 127.0.0.1 (appendonly yes)",
            "ort_intra_op_threads": 1,
            "batched": "MAX_BATCH_SIZE encode/decode 16, generate 8; MAX_WAIT_MS 5/5/10 (defaults)",
            "unbatched": "MAX_BATCH_SIZE_<TASK>=1",
            "client": "httpx.AsyncClient per in-flight request slot, closed loop, uvloop",
        },
        "duration_s_per_point": args.duration,
        "rounds_per_point": args.rounds,
        "generate_steps": 4,
        "runs": runs,
        "overhead_ms": {
            e: overhead["batched"][e]["p50_ms"] for e in args.endpoints if e in overhead["batched"]
        },
        "overhead_detail": overhead,
        "batching_ratio_c32": {
            e: round(runs[e]["batched"]["32"]["rps"] / runs[e]["unbatched"]["32"]["rps"], 2)
            for e in args.endpoints
            if "32" in runs[e]["batched"] and runs[e]["unbatched"]["32"]["rps"]
        },
        "worker_cpu_ratio_c32": worker_cpu_ratios(runs, args.endpoints),
    }
    if not args.no_overload:
        result["overload"] = overload_run(args, repository, model, requests)
    if args.memory_requests:
        result["memory"] = memory_run(args, repository, model, requests)
    result["wall_s"] = round(time.time() - started, 1)
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return result


def worker_cpu_ratios(runs: dict, endpoints: list[str]) -> dict[str, float]:
    """Unbatched ÷ batched worker CPU per request at concurrency 32: what batching saves where it acts.

    End-to-end throughput on one machine also pays the client's and API's per-request CPU, which
    batching cannot reduce; this ratio isolates the worker, the part that scales out on its own cores.
    """
    ratios = {}
    for e in endpoints:
        points = [
            runs[e][mode].get("32", {}).get("cpu_ms_per_request", {}) for mode in ("batched", "unbatched")
        ]
        batched, unbatched = (sum(v for k, v in p.items() if k.startswith("worker")) for p in points)
        if batched > 0 and unbatched > 0:
            ratios[e] = round(unbatched / batched, 2)
    return ratios


if __name__ == "__main__":
    main()
