"""deploy/compose.yaml brought up with podman-compose: Redis, two API replicas, a worker, Prometheus.

The file is used as users run it; only its image variables point at what this machine has (the PAE
image just built, and the Debian stand-ins for redis and prom/prometheus). Grafana has no Debian
package, so it is the one service not started. Each API replica must answer a generate on its own
port, byte-identical to the golden PNG, Prometheus must scrape both replicas and the worker, and the
containers must run with the file's security options.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import checks
import engine
import httpx

COMPOSE = engine.REPO / "deploy" / "compose.yaml"
PROJECT = "pae-image-test"
SERVICES = ("redis", "api", "worker", "prometheus")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose(images: dict[str, str], prometheus_port: int, *args: str, log: Path) -> None:
    """One podman-compose command on the project, its output appended to `log`."""
    env = {
        **engine.environment(),
        "PAE_IMAGE": images["cpu"],
        "REDIS_IMAGE": images["redis"],
        "PROMETHEUS_IMAGE": images["prometheus"],
        "PROMETHEUS_PORT": str(prometheus_port),
    }
    env.pop("API_KEY", None)  # the stack under test runs without one; compose passes the caller's through
    command = ["podman-compose", "--project-name", PROJECT, "--file", str(COMPOSE), *args]
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=600)


def scraped_targets(prometheus: str) -> dict[str, int]:
    """job → number of targets Prometheus reports up."""
    active = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    up: dict[str, int] = {}
    for target in active:
        job = target["labels"]["job"]
        up[job] = up.get(job, 0) + (target["health"] == "up")
    return up


def wait_scraped(prometheus: str, want: dict[str, int], timeout_s: float) -> dict[str, int]:
    """Poll until every job in `want` has at least that many targets up (or the time runs out)."""
    deadline = time.monotonic() + timeout_s
    up: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            up = scraped_targets(prometheus)
        except (httpx.HTTPError, KeyError, ValueError):
            up = {}
        if all(up.get(job, 0) >= n for job, n in want.items()):
            break
        time.sleep(2)
    return up


def run(report: checks.Report, images: dict[str, str], log: Path, ready_timeout_s: float) -> dict:
    """Bring the stack up, check it, take it down; returns timings for the JSON."""
    prometheus_port = free_port()
    timings: dict[str, float] = {}
    start = time.monotonic()
    compose(images, prometheus_port, "down", "--volumes", log=log)
    try:
        compose(images, prometheus_port, "up", "--detach", "--no-build", *SERVICES, log=log)
        replicas = [engine.Container(f"{PROJECT}_api_{n}") for n in (1, 2)]
        worker = engine.Container(f"{PROJECT}_worker_1")
        for replica in replicas:
            replica.ports[8000] = replica.host_port(8000)
            name = replica.name
            report.attempt(
                f"compose: {name} ready",
                lambda r=replica: (True, f"{checks.wait_ready(r.url(), ready_timeout_s):.1f} s"),
            )
            report.attempt(
                f"compose: generate through {name} on its own port",
                lambda r=replica: checks.one_generate(r.url()),
            )
            report.attempt(
                f"compose: {name} counted that request in its own /metrics",
                lambda r=replica: checks.api_metrics_count_requests(r.url()),
            )
        timings["up_to_answers_s"] = round(time.monotonic() - start, 1)
        report.attempt(
            "compose: API replicas run with compose.yaml's security options",
            lambda: checks.security_options(replicas[0]),
        )
        report.attempt(
            "compose: worker runs with compose.yaml's security options",
            lambda: checks.security_options(worker),
        )
        report.check("compose: worker healthcheck passes", worker.healthcheck())
        up = wait_scraped(
            f"http://127.0.0.1:{prometheus_port}", {"pae-api": 2, "pae-worker": 1}, ready_timeout_s
        )
        report.check(
            "compose: Prometheus scrapes both API replicas and the worker",
            up.get("pae-api", 0) >= 2 and up.get("pae-worker", 0) >= 1,
            f"targets up: {up}",
        )
    finally:
        if report.failed:
            for name in ("api_1", "api_2", "worker_1", "redis_1", "prometheus_1"):
                with log.open("a") as out:
                    out.write(f"--- {PROJECT}_{name} ---\n{engine.Container(f'{PROJECT}_{name}').logs()}\n")
        compose(images, prometheus_port, "down", "--volumes", log=log)
    timings["total_s"] = round(time.monotonic() - start, 1)
    return timings
