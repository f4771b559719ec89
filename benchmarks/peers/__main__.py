"""This service against its peers on the same machine, graphs and ONNX Runtime options.

    .venv/bin/python -m benchmarks.peers [--duration 5] [--concurrency 1,2,4,8,16,32]
        [--repetitions 2] [--servers service,plain,ray] [--ort-threads 1] [--profile]

Servers (benchmarks/peers/servers.py): this service as `make run` starts it, a plain single-process
FastAPI + ONNX Runtime server (no queue, no batching), and Ray Serve with `@serve.batch` when Ray is
installed (`pip install -e '.[peers]'`; skipped with a message otherwise). The service and the plain
server run side by side and take turns point by point, so a drift of the machine's speed falls on
both alike; Ray Serve, whose idle processes take a tenth of a core, runs alone. One closed-loop
client (benchmarks/peers/client.py) checks every answer against the reference graphs.
Every repetition measures the graphs' ceiling (batch 1 and batch `--batch`, nothing else running),
then the servers, in reverse order on the next repetition. Writes
`benchmarks/results/peers.json`, `peers.png` and prints a markdown table.

Every server's sessions get the same ONNX Runtime options (`--ort-threads` intra-op threads, one by
default: the ceiling then is one core's, as the issue's yardstick was, and each server uses the
machine's cores its own way — the service one batch per core, the plain server one request per
thread-pool thread, Ray Serve one replica per core).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.machine import RESULTS, mark_quotable
from benchmarks.peers.client import ENDPOINTS, Workload
from benchmarks.peers.profile import py_spy
from benchmarks.peers.report import TARGETS, figures, markdown_table, plot
from benchmarks.peers.servers import SERVERS, ray_available
from benchmarks.peers.sweep import Plan, run_sweep
from benchmarks.topology import machine_info
from benchmarks.traffic import ModelShape
from export.repository import resolve_version_dir

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per (server, endpoint, c)")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument(
        "--ort-threads",
        type=int,
        default=1,
        help="intra-op threads of every server's sessions and the ceiling's (0: ONNX Runtime's choice)",
    )
    parser.add_argument("--batch", type=int, default=16, help="batch size of the ceiling (the servers' max)")
    parser.add_argument("--ceiling-seconds", type=float, default=1.5, help="timing per graph and batch size")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy each server at the top concurrency (pip install py-spy)",
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="fmnist32-tiny")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    args.endpoints = [e for e in args.endpoints.split(",") if e]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if set(args.servers) - set(SERVERS) or set(args.endpoints) - set(ENDPOINTS):
        parser.error(f"--servers must name {', '.join(SERVERS)}; --endpoints {', '.join(ENDPOINTS)}")
    return args


def available(servers: Sequence[str]) -> list[str]:
    """`servers` without Ray Serve when it is not installed (said on stderr)."""
    if "ray" in servers and not ray_available():
        print(
            "Ray Serve is not installed (pip install -e '.[peers]'): skipping the ray peer", file=sys.stderr
        )
        return [s for s in servers if s != "ray"]
    return list(servers)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    args.servers = available(args.servers)
    machine = machine_info()
    version_dir = resolve_version_dir(args.repository, args.model)
    shape = ModelShape.load(args.repository, args.model)
    workload = Workload(shape, version_dir, "127.0.0.1")
    plan = Plan(
        args.servers,
        args.endpoints,
        args.concurrency,
        args.duration,
        args.repetitions,
        args.ort_threads,
        args.batch,
        args.ceiling_seconds,
        args.profile,
    )
    started = time.time()
    if args.profile and py_spy() is None:
        sys.exit("--profile needs py-spy: pip install py-spy")
    runs, ceilings, profiles = run_sweep(plan, version_dir, workload)
    result = mark_quotable(
        {
            "machine": machine,
            "model": f"{args.model} v{version_dir.name} ({args.repository.name})",
            "command": " ".join(
                ["python", "-m", "benchmarks.peers", *(argv if argv is not None else sys.argv[1:])]
            ),
            "plan": {**plan.__dict__, "servers": list(plan.servers), "endpoints": list(plan.endpoints)},
            "setup": {
                "service": "pae-serve with no REDIS_URL (make run): API, worker process, redis-server",
                "plain": "benchmarks/peers/plain.py: FastAPI, synchronous handlers, ONNX Runtime at batch 1",
                "ray": "benchmarks/peers/ray_peer.py: Ray Serve, one replica per compute thread, @serve.batch(16, 5 ms)",
                "client": "benchmarks/peers/client.py: keep-alive HTTP/1.1 closed loop, every answer checked",
                "order": "service and plain up together, alternating point by point; ray alone (sweep.TOGETHER)",
                "ort": f"service.runtimes.onnxruntime.session_options(intra_op_threads={args.ort_threads}, 1)",
            },
            "targets": TARGETS,
            "figures": figures(runs, ceilings, args.batch),
            "ceilings": ceilings,
            "profiles": profiles,
            "runs": runs,
        }
    )
    result["wall_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(markdown_table(runs, ceilings, args.batch))
    print(json.dumps(result["figures"], indent=2))
    return result


if __name__ == "__main__":
    main()
