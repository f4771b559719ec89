"""The local PAE stack without Docker: the compose topology as plain processes on 127.0.0.1.

    python deploy/stack.py up       # redis-server, 2 API replicas, 2 workers, Prometheus; returns when ready
    python deploy/stack.py check    # bounded traffic, then p99 latency per endpoint from Prometheus's API
    python deploy/stack.py status
    python deploy/stack.py down

Why plain processes: no Docker engine runs on the development machines, yet the deployment's moving
parts (shared Redis, several API replicas, several workers, a real Prometheus with the shipped scrape
config and alert rules) should be exercised together. The processes are started, probed and stopped
by service/launcher.py, as `pae-serve` and the benchmarks start theirs; each runs under coreutils
`timeout`, so a stack nobody stops still ends after `--lifetime` seconds. PIDs, logs and the rendered
Prometheus config live in the run directory (default runs/stack).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from service.launcher import (
    LOOPBACK,
    LaunchError,
    Proc,
    find_binary,
    http_get,
    port_is_free,
    start_api,
    start_process,
    start_worker,
    stop_processes,
    wait_until_ready,
)
from service.redis_server import RedisServer, find_redis_server

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
SHIPPED_RULES = REPO / "deploy" / "prometheus" / "rules.yml"
STATE_FILE = "stack.json"
ENDPOINTS = ("encode", "decode", "generate", "models", "healthz", "readyz")
PATHS = {"models": "/v1/models", "healthz": "/healthz", "readyz": "/readyz"}


class StackError(LaunchError):
    """The stack cannot start or answer; the message says what to fix."""


@dataclass(frozen=True)
class StackConfig:
    """Where everything listens and how long it may live."""

    run_dir: Path = REPO / "runs" / "stack"
    redis_port: int = 6391
    api_ports: tuple[int, ...] = (8101, 8102)
    worker_ports: tuple[int, ...] = (9201, 9202)
    prometheus_port: int = 9091
    scrape_interval: str = "5s"
    lifetime_s: int = 1800
    ready_timeout_s: float = 180.0
    model_repository: Path = REPO / "model_repository"
    model_name: str = "fmnist32-tiny"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"


# ---------------------------------------------------------------- Prometheus configuration


def render_prometheus_config(shipped: dict, cfg: StackConfig, rules_path: Path = SHIPPED_RULES) -> dict:
    """The shipped compose config with DNS discovery swapped for the local processes' addresses.

    Everything else (jobs, relabelling, rules) is kept, so the local Prometheus scrapes and alerts
    exactly as the compose one does; only the scrape interval is shortened so a short run has data.
    """
    config = json.loads(json.dumps(shipped))
    config.setdefault("global", {})
    config["global"]["scrape_interval"] = cfg.scrape_interval
    config["global"]["evaluation_interval"] = cfg.scrape_interval
    config["rule_files"] = [str(rules_path)]
    targets = {
        "pae-api": [f"127.0.0.1:{p}" for p in cfg.api_ports],
        "pae-worker": [f"127.0.0.1:{p}" for p in cfg.worker_ports],
        "prometheus": [f"127.0.0.1:{cfg.prometheus_port}"],
    }
    jobs = {job["job_name"]: job for job in config.get("scrape_configs", [])}
    missing = sorted(set(targets) - set(jobs))
    if missing:
        raise StackError(f"{SHIPPED_CONFIG} has no scrape job named {', '.join(missing)}")
    for name, addresses in targets.items():
        job = jobs[name]
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": addresses}]
    return config


def check_prometheus_config(path: Path) -> None:
    """Run promtool on a rendered config (and its rules) so a bad file fails before anything starts."""
    promtool = find_binary("promtool", "Debian package `prometheus`")
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise StackError(f"promtool rejected {path}:\n{result.stdout}{result.stderr}")


# ---------------------------------------------------------------- HTTP


def http_post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    """POST a JSON body and return the JSON answer; anything but 200 is a StackError with the body."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StackError(f"POST {url} answered {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise StackError(f"POST {url} failed: {exc}") from None


def prometheus_query(port: int, query: str) -> list[dict]:
    """An instant query against Prometheus's HTTP API; the result vector."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = http_get(url, timeout=10.0)
    if status != 200:
        raise StackError(f"Prometheus answered {status} to {query!r}: {body[:300]!r}")
    payload = json.loads(body)
    if payload.get("status") != "success":
        raise StackError(f"Prometheus query {query!r} failed: {payload}")
    return payload["data"]["result"]


def wait_for_targets_up(port: int, expected: int, timeout_s: float) -> None:
    """Wait until Prometheus has scraped `expected` targets successfully (health "up")."""
    deadline = time.monotonic() + timeout_s
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        status, body = http_get(f"http://127.0.0.1:{port}/api/v1/targets?state=active")
        if status == 200:
            active = json.loads(body)["data"]["activeTargets"]
            health = {t["scrapeUrl"]: t["health"] for t in active}
            if sum(h == "up" for h in health.values()) >= expected:
                return
        time.sleep(1.0)
    raise StackError(f"Prometheus targets not all up after {timeout_s:.0f} s: {health}")


# ---------------------------------------------------------------- commands


def load_state(run_dir: Path) -> list[Proc]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return []
    return [Proc.from_json(entry) for entry in json.loads(path.read_text())["processes"]]


def save_state(run_dir: Path, cfg: StackConfig, procs: Sequence[Proc]) -> None:
    state = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "processes": [p.to_json() for p in procs],
    }
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def preflight(cfg: StackConfig) -> dict[str, str]:
    """Every binary, port and file the stack needs, checked before anything starts."""
    ports = [cfg.redis_port, *cfg.api_ports, *cfg.worker_ports, cfg.prometheus_port]
    if len(set(ports)) != len(ports):
        raise StackError(f"ports must be distinct, got {ports}")
    busy = [p for p in ports if not port_is_free(p)]
    if busy:
        raise StackError(f"ports already in use on {LOOPBACK}: {busy}; pick others (see --help)")
    model_dir = cfg.model_repository / cfg.model_name
    if not model_dir.is_dir():
        raise StackError(f"no model repository at {model_dir}; run `make export` first")
    return {
        "redis-server": find_redis_server(),
        "prometheus": find_binary("prometheus", "Debian package `prometheus`"),
    }


def up(cfg: StackConfig) -> list[Proc]:
    """Start the whole stack and return once every process answers and Prometheus scrapes them all."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if any(p.alive() for p in load_state(cfg.run_dir)):
        raise StackError(f"a stack is already running from {cfg.run_dir}; run `down` first")
    binaries = preflight(cfg)
    prom_config = cfg.run_dir / "prometheus.yml"
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    prom_config.write_text(yaml.safe_dump(render_prometheus_config(shipped, cfg), sort_keys=False))
    check_prometheus_config(prom_config)

    logs = cfg.run_dir / "logs"
    service_env = {
        "REDIS_URL": cfg.redis_url,
        "MODEL_REPOSITORY": str(cfg.model_repository),
        "MODEL_NAME": cfg.model_name,
        "OMP_NUM_THREADS": "1",
    }
    common = {"cwd": cfg.run_dir, "lifetime_s": cfg.lifetime_s}
    procs: list[Proc] = []
    try:
        redis = RedisServer(
            cfg.redis_port,
            workdir=cfg.run_dir / "redis",
            binary=binaries["redis-server"],
            lifetime_s=cfg.lifetime_s,
            log=logs / "redis.log",
        )
        redis.start(timeout_s=20.0)
        procs.append(redis.proc)
        for i, port in enumerate(cfg.worker_ports, start=1):
            # One ONNX Runtime thread per worker: the stack shares a few cores with everything else.
            env = {**service_env, "ORT_INTRA_OP_THREADS": "1"}
            procs.append(start_worker(f"worker-{i}", port, log=logs / f"worker-{i}.log", env=env, **common))
        for i, port in enumerate(cfg.api_ports, start=1):
            multiproc = cfg.run_dir / f"api-{i}-metrics"
            shutil.rmtree(multiproc, ignore_errors=True)
            multiproc.mkdir()
            env = {**service_env, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
            procs.append(start_api(f"api-{i}", port, log=logs / f"api-{i}.log", env=env, **common))
        procs.append(start_prometheus(binaries["prometheus"], prom_config, cfg))
        save_state(cfg.run_dir, cfg, procs)
        wait_until_ready(procs, cfg.ready_timeout_s)
        expected = len(cfg.api_ports) + len(cfg.worker_ports) + 1
        wait_for_targets_up(cfg.prometheus_port, expected, timeout_s=60.0)
    except BaseException:
        stop_processes(procs)
        (cfg.run_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    return procs


def start_prometheus(binary: str, config: Path, cfg: StackConfig) -> Proc:
    return start_process(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={cfg.run_dir / 'prometheus-data'}",
            f"--web.listen-address={LOOPBACK}:{cfg.prometheus_port}",
            "--storage.tsdb.retention.time=1d",
        ],
        log=cfg.run_dir / "logs" / "prometheus.log",
        cwd=cfg.run_dir,
        lifetime_s=cfg.lifetime_s,
        probe=f"http://{LOOPBACK}:{cfg.prometheus_port}/-/ready",
    )


def down(run_dir: Path) -> list[str]:
    """Stop every process the state file lists; return the names that were still running."""
    procs = load_state(run_dir)
    # Redis last, so the API replicas and workers deregister and drain against a live Redis.
    stopped = stop_processes([p for p in procs if p.name != "redis"])
    stopped += stop_processes([p for p in procs if p.name == "redis"])
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def status(run_dir: Path) -> list[tuple[str, int, bool, int]]:
    """(name, pid, alive, probe HTTP status) per recorded process."""
    rows = []
    for proc in load_state(run_dir):
        alive = proc.alive()
        code = http_get(proc.probe, timeout=2.0)[0] if alive and proc.probe else 0
        rows.append((proc.name, proc.pid, alive, code))
    return rows


def round_trip(port: int, seed: int) -> None:
    """One generate → encode → decode chain through an API replica (the API's own JSON formats)."""
    base = f"http://127.0.0.1:{port}"
    generated = http_post_json(
        f"{base}/v1/generate", {"class_label": 0, "num_images": 1, "steps": 4, "seed": seed}
    )
    latents = http_post_json(f"{base}/v1/encode", {"images": [generated["images"][0]["png"]]})
    http_post_json(f"{base}/v1/decode", {k: latents[k] for k in ("shape", "dtype", "data")})


def check(run_dir: Path, traffic_s: float = 25.0, settle_s: float = 12.0) -> dict[str, float]:
    """Send bounded traffic to every API replica, then ask Prometheus for p99 latency per endpoint.

    Proves the dashboard's latency panels have data: the same histogram_quantile the dashboard draws,
    answered by the real Prometheus from the real replicas' metrics. Traffic is spread over several
    scrape intervals because rate() needs a series to grow between two scrapes: a burst that lands
    before a series' first scrape reads as a rate of zero (and a NaN quantile). Raises if any
    endpoint has no finite p99.
    """
    state = json.loads((run_dir / STATE_FILE).read_text())
    cfg = state["config"]
    api_ports = [int(p) for p in cfg["api_ports"]]
    deadline = time.monotonic() + traffic_s
    seed = 0
    while time.monotonic() < deadline:
        for port in api_ports:
            round_trip(port, seed=seed)
            for path in PATHS.values():
                http_get(f"http://127.0.0.1:{port}{path}")
        seed += 1
        time.sleep(0.5)
    time.sleep(settle_s)
    query = "histogram_quantile(0.99, sum by (endpoint, le) (rate(pae_request_duration_seconds_bucket[1m])))"
    result = prometheus_query(int(cfg["prometheus_port"]), query)
    p99 = {r["metric"].get("endpoint", ""): float(r["value"][1]) for r in result}
    missing = [e for e in ENDPOINTS if not math.isfinite(p99.get(e, math.nan))]
    if missing:
        raise StackError(f"no finite p99 latency for {missing} from Prometheus; got {p99}")
    return p99


def parse_ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated port numbers, got {text!r}") from None
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"expected comma-separated ports in 1..65535, got {text!r}")
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: up / down / status / check."""
    defaults = StackConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status", "check"])
    parser.add_argument("--run-dir", type=Path, default=defaults.run_dir)
    parser.add_argument("--redis-port", type=int, default=defaults.redis_port)
    parser.add_argument("--api-ports", type=parse_ports, default=defaults.api_ports)
    parser.add_argument("--worker-ports", type=parse_ports, default=defaults.worker_ports)
    parser.add_argument("--prometheus-port", type=int, default=defaults.prometheus_port)
    parser.add_argument("--scrape-interval", default=defaults.scrape_interval)
    parser.add_argument(
        "--lifetime", type=int, default=defaults.lifetime_s, help="seconds before every process ends"
    )
    parser.add_argument("--model-repository", type=Path, default=defaults.model_repository)
    parser.add_argument("--model-name", default=defaults.model_name)
    args = parser.parse_args(argv)
    if args.lifetime <= 0:
        parser.error(f"--lifetime must be positive, got {args.lifetime}")
    cfg = StackConfig(
        run_dir=args.run_dir.resolve(),
        redis_port=args.redis_port,
        api_ports=args.api_ports,
        worker_ports=args.worker_ports,
        prometheus_port=args.prometheus_port,
        scrape_interval=args.scrape_interval,
        lifetime_s=args.lifetime,
        model_repository=args.model_repository.resolve(),
        model_name=args.model_name,
    )
    try:
        if args.command == "up":
            procs = up(cfg)
            for proc in procs:
                print(f"{proc.name:<12} pid {proc.pid:<8} {proc.probe or '-'}")
            print(f"Prometheus: http://127.0.0.1:{cfg.prometheus_port}  logs: {cfg.run_dir / 'logs'}")
            print(f"every process ends by itself after {cfg.lifetime_s} s; stop sooner with `down`")
        elif args.command == "down":
            stopped = down(cfg.run_dir)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        elif args.command == "status":
            rows = status(cfg.run_dir)
            if not rows:
                print(f"no stack recorded in {cfg.run_dir}")
            for name, pid, alive, code in rows:
                print(f"{name:<12} pid {pid:<8} {'running' if alive else 'stopped'}  probe {code or '-'}")
            return 0 if rows and all(alive for _, _, alive, _ in rows) else 1
        else:
            for endpoint, seconds in sorted(check(cfg.run_dir).items()):
                print(f"p99 {endpoint:<10} {seconds * 1000:.1f} ms")
    except LaunchError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
