"""Settings of this service against each other (and the plain server), side by side on one machine.

    .venv/bin/python -m benchmarks.peers.ab --config DIRECT_SLOTS=8 --config DIRECT_SLOTS=16 \\
        [--plain] [--endpoints encode,decode] [--concurrency 16] [--repetitions 2] \\
        [--warmup-concurrency 8] [--out benchmarks/results/peers_ab.json]

Each `--config` is a comma-separated list of environment variables for one `pae-serve` (as `make
run` starts it). Every configuration (and with `--plain` the plain peer) runs in turn, the order
reversed on each repetition, with the same checking client and warm-up as `benchmarks.peers`; the
JSON holds req/s per configuration, endpoint and concurrency, each repetition's, with the load
average. For questions like "how many lane slots", where a full peers run would take ten minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks.machine import RESULTS, mark_quotable
from benchmarks.peers.client import ENDPOINTS, Workload, closed_loop
from benchmarks.peers.servers import Running, start_server
from benchmarks.topology import machine_info
from benchmarks.traffic import ModelShape, drive
from export.repository import resolve_version_dir

ROOT = Path(__file__).resolve().parents[2]
PLAIN = "plain"


def parse_config(text: str) -> dict[str, str]:
    """ "A=1,B=2" → {"A": "1", "B": "2"}; a malformed entry is an error naming it."""
    env = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--config entries are NAME=VALUE, got {item!r}")
        env[name.strip()] = value.strip()
    return env


@contextlib.contextmanager
def started(config: str, version_dir: Path, threads: int, logs: Path) -> Iterator[Running]:
    """The plain server, or `pae-serve` with the configuration's variables."""
    if config == PLAIN:
        server = start_server("plain", version_dir, threads, logs)
    else:
        server = start_server("service", version_dir, threads, logs, parse_config(config))
    try:
        yield server
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.ab", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", action="append", required=True, help="NAME=VALUE[,NAME=VALUE] for one pae-serve"
    )
    parser.add_argument("--plain", action="store_true", help="also run the plain FastAPI + ONNX Runtime peer")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--concurrency", default="16")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--warmup-concurrency", type=int, default=8)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--ort-threads", type=int, default=1)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="fmnist32-tiny")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers_ab.json")
    args = parser.parse_args(argv)
    endpoints = [e for e in args.endpoints.split(",") if e]
    if set(endpoints) - set(ENDPOINTS):
        parser.error(f"--endpoints must name {', '.join(ENDPOINTS)}")
    try:
        for config in args.config:
            parse_config(config)
    except ValueError as exc:
        parser.error(str(exc))
    concurrency = [int(c) for c in args.concurrency.split(",")]
    configs = [*args.config, *([PLAIN] if args.plain else [])]
    machine = machine_info()
    version_dir = resolve_version_dir(args.repository, args.model)
    workload = Workload(ModelShape.load(args.repository, args.model), version_dir, "127.0.0.1")
    rps: dict[str, dict[str, dict[str, list[float]]]] = {
        config: {e: {str(c): [] for c in concurrency} for e in endpoints} for config in configs
    }
    load: list[float] = []
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="pae-ab-") as logs:
        for rep in range(args.repetitions):
            for config in configs if rep % 2 == 0 else reversed(configs):
                with started(config, version_dir, args.ort_threads, Path(logs) / f"{rep}") as server:
                    for endpoint in endpoints:
                        drive(
                            closed_loop(
                                workload, endpoint, server.port, args.warmup_concurrency, args.warmup_seconds
                            )
                        )
                        for c in concurrency:
                            samples, elapsed = drive(
                                closed_loop(workload, endpoint, server.port, c, args.duration)
                            )
                            bad = [s for s in samples if not s.ok]
                            if bad:
                                sys.exit(
                                    f"{config} {endpoint} c={c}: {len(bad)} wrong answers, e.g. {bad[0].error}"
                                )
                            rps[config][endpoint][str(c)].append(round(len(samples) / elapsed, 1))
                            load.append(round(os.getloadavg()[0], 2))
                            print(
                                f"rep {rep + 1} {config:24s} {endpoint} c={c}: {rps[config][endpoint][str(c)][-1]} req/s"
                            )
    result = mark_quotable(
        {
            "machine": machine,
            "command": " ".join(
                ["python", "-m", "benchmarks.peers.ab", *(argv if argv is not None else sys.argv[1:])]
            ),
            "model": f"{args.model} v{version_dir.name}",
            "plan": {
                "configs": configs,
                "endpoints": endpoints,
                "concurrency": concurrency,
                "duration_s": args.duration,
                "repetitions": args.repetitions,
                "warmup_concurrency": args.warmup_concurrency,
                "ort_threads": args.ort_threads,
            },
            "rps": rps,
            "load_average_per_point": load,
            "wall_s": round(time.time() - start, 1),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rps, indent=1))
    return result


if __name__ == "__main__":
    main()
