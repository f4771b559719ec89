"""Console entry points: `pae-serve` (the API, embedded Redis + worker by default) and `pae-worker`.

Heavy imports (FastAPI app, metrics, runtimes) happen inside the functions: `PROMETHEUS_MULTIPROC_DIR`
must be set before prometheus_client creates any metric when several processes (API processes, the
embedded worker) share one metrics view.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from service.settings import Settings, SettingsError, usable_cores

log = logging.getLogger("service")

DEFAULT_MODEL = "fmnist32-tiny"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"invalid setting: {exc}")


def _has_version(settings: Settings) -> bool:
    model_dir = settings.model_repository / settings.model_name
    if settings.model_version is not None:
        return (model_dir / settings.model_version).is_dir()
    return model_dir.is_dir() and any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir())


def ensure_default_model(settings: Settings) -> None:
    """Export the committed default checkpoint on first start (a `pae-export` subprocess), if missing.

    Only the default model is exported automatically; any other missing model is an error, because
    guessing which checkpoint to export would be wrong.
    """
    if _has_version(settings):
        return
    if settings.model_name != DEFAULT_MODEL:
        sys.exit(
            f"model {settings.model_name!r} is not in {settings.model_repository}; export it with "
            "pae-export --checkpoint <dir> --repository <repo>"
        )
    checkpoint = PROJECT_ROOT / "checkpoints" / DEFAULT_MODEL
    if not checkpoint.is_dir():
        sys.exit(f"the default model is not exported and its checkpoint {checkpoint} is missing")
    exporter = Path(sys.executable).with_name("pae-export")
    command = [str(exporter) if exporter.is_file() else (shutil.which("pae-export") or "pae-export")]
    command += ["--checkpoint", str(checkpoint), "--repository", str(settings.model_repository)]
    log.info("first start: exporting %s into %s", checkpoint, settings.model_repository)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        sys.exit(f"exporting the default model failed ({' '.join(command)} exited {result.returncode})")


def _lane_slots(settings: Settings, cores: int) -> int:
    from export.repository import resolve_version_dir
    from service.direct import default_slots

    version_dir = resolve_version_dir(settings.model_repository, settings.model_name, settings.model_version)
    return default_slots(version_dir, cores, settings.runs_concurrently)


def embedded_direct_slots(settings: Settings, replicas: int) -> int:
    """DIRECT_SLOTS when `pae-serve` runs everything on one machine (`service.direct.default_slots`
    over the usable cores shared by the API replicas)."""
    slots = _lane_slots(settings, max(1, usable_cores() // replicas))
    log.info("direct lane: %d slot(s) per API replica (DIRECT_SLOTS; service/direct.py)", slots)
    return slots


def api_processes(requested: str, settings: Settings) -> int:
    """`--workers`: a number, or `auto`: one API process per usable core when the API computes
    encode and decode itself (embedded Redis and the direct lane on: each process then has a core
    for its event loop and lane), else one (the API only validates and enqueues; scale it by
    replicas, as the Kubernetes deployment does)."""
    if requested != "auto":
        count = int(requested) if requested.isdigit() else 0
        if count < 1:
            raise SettingsError(f"--workers must be a positive number or auto, got {requested!r}")
        return count
    if settings.redis_configured:
        return 1
    lane = settings.direct_slots if "DIRECT_SLOTS" in os.environ else _lane_slots(settings, usable_cores())
    return usable_cores() if lane > 0 else 1


def lane_threads_env(settings: Settings, processes: int) -> dict[str, str]:
    """COMPUTE_THREADS for API processes that share the cores: each lane gets its share, as each
    gets its share of the slots (the embedded worker keeps the whole machine's)."""
    if processes < 2 or not settings.runs_concurrently or "COMPUTE_THREADS" in os.environ:
        return {}
    return {"COMPUTE_THREADS": str(max(1, settings.batch_threads // processes))}


def serve_main(argv: Sequence[str] | None = None) -> None:
    """`pae-serve`: run the API; with no Redis named (REDIS_URL or REDIS_SENTINELS) also a private
    redis-server and one worker process."""
    parser = argparse.ArgumentParser(prog="pae-serve", description=serve_main.__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--workers",
        default=os.environ.get("API_WORKERS", "auto"),
        help="API processes behind the port (API_WORKERS): a number, or auto (see api_processes)",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _settings()
    ensure_default_model(settings)
    try:
        processes = api_processes(args.workers, settings)
    except SettingsError as exc:
        parser.error(str(exc))

    multiproc_dir = None
    # Several API processes, or the API and its embedded worker process, share one metrics view.
    several = processes > 1 or not settings.redis_configured
    if several and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiproc_dir = tempfile.mkdtemp(prefix="pae-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    # Only now: service.direct imports the metrics, which must see PROMETHEUS_MULTIPROC_DIR first.
    if not settings.redis_configured and "DIRECT_SLOTS" not in os.environ:
        os.environ["DIRECT_SLOTS"] = str(embedded_direct_slots(settings, processes))

    import uvicorn

    from service.api.server import PROTOCOL
    from service.embedded import WorkerProcess
    from service.launcher import LaunchError
    from service.redis_server import RedisServer
    from service.replicas import ReplicaSet

    # uvicorn re-raises the SIGTERM it handled once it has shut down; turning that into SystemExit
    # lets the `finally` below stop the embedded worker and redis-server instead of orphaning them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    embedded: RedisServer | None = None
    worker: WorkerProcess | None = None
    replicas: ReplicaSet | None = None
    try:
        if not settings.redis_configured:
            try:
                embedded = RedisServer()
                url = embedded.start()
            except LaunchError as exc:
                sys.exit(f"pae-serve: {exc}")
            os.environ["REDIS_URL"] = url
            worker = WorkerProcess(url, args.log_level)
            try:
                pid = worker.start().program_pid
            except LaunchError as exc:
                sys.exit(f"pae-serve: the embedded worker did not start: {exc}")
            log.info("embedded mode: redis at %s, worker process %d", url, pid)
        if processes > 1:
            replicas = ReplicaSet(
                processes, args.host, args.port, args.log_level, env=lane_threads_env(settings, processes)
            )
            try:
                replicas.bind()
            except OSError as exc:
                sys.exit(f"pae-serve: cannot listen on {args.host}:{args.port}: {exc}")
            replicas.serve()
        else:
            uvicorn.run(
                "service.app:create_app",
                factory=True,
                http=PROTOCOL,
                host=args.host,
                port=args.port,
                log_level=args.log_level,
            )
    finally:
        if replicas is not None:
            replicas.stop()
        if worker is not None:
            worker.stop()
        if embedded is not None:
            embedded.stop()
        if multiproc_dir is not None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)


def worker_main(argv: Sequence[str] | None = None) -> None:
    """`pae-worker`: load the runtime, warm it up, serve the task streams until SIGTERM."""
    parser = argparse.ArgumentParser(prog="pae-worker", description=worker_main.__doc__)
    parser.add_argument("--tasks", default="encode,decode,generate", help="comma-separated tasks to serve")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--exit-with-parent",
        type=int,
        metavar="PID",
        help="drain and exit when process PID (the parent that started this worker) is gone",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _settings()
    if not settings.redis_configured:
        sys.exit("pae-worker needs REDIS_URL or REDIS_SENTINELS (the embedded Redis belongs to pae-serve)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"encode", "decode", "generate"})
    if unknown or not tasks:
        parser.error(f"--tasks must name encode, decode and/or generate; got {args.tasks!r}")

    from prometheus_client import start_http_server

    from export.repository import resolve_version_dir
    from service import metrics
    from service.runtimes import load_runtime
    from service.worker import Worker

    version_dir = resolve_version_dir(settings.model_repository, settings.model_name, settings.model_version)
    runtime = load_runtime(settings, version_dir)
    runtime.warmup({t: settings.max_batch_size[t] for t in tasks})
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.registry())
    worker = Worker(settings, runtime, tasks=tasks)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if args.exit_with_parent:
            watch = asyncio.create_task(_stop_when_orphaned(worker, args.exit_with_parent))
        await worker.run()
        if args.exit_with_parent:
            watch.cancel()

    _run_event_loop(run())
    log.info("worker %s drained and stopped", worker.worker_id)


async def _stop_when_orphaned(worker, parent: int, every_s: float = 0.5) -> None:
    """Stop `worker` once `parent` is no longer this process's parent (it exited or was killed)."""
    while os.getppid() == parent:
        await asyncio.sleep(every_s)
    log.warning("parent process %d is gone; the worker drains and stops", parent)
    worker.stop()


def _run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (uvicorn[standard] brings it, and the API runs on it too): the worker's
    loop handles every job's Redis traffic, and uvloop's costs less CPU per callback than asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
