"""The service's real topology as processes, and the traffic that drives it, for the load and fault runs.

Everything listens on 127.0.0.1: a `redis-server` on a free port (restartable on the same port and
data folder), API replicas started with `pae-serve` and workers with `pae-worker`, each under
coreutils `timeout` so nothing outlives a run that is interrupted. Traffic is an async httpx client
keeping `c` requests in flight (a closed loop); every answer is checked to belong to its request
(the seed for generate; for encode and decode, the output a local ONNX Runtime session computes for
that input) so a mixed-up reply is counted as an error, not a success.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import redis
from PIL import Image

from benchmarks.machine import describe
from export.repository import ModelConfig, list_versions, resolve_version_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = "fmnist32-tiny"
TASKS = ("encode", "decode", "generate")
GENERATE_STEPS = 4
LIFETIME_S = 3600
CONNECTION_RETRY_S = 0.2
T = TypeVar("T")


def machine_info() -> dict[str, object]:
    """The machine block, with the ONNX Runtime and redis-server versions the service ran on."""
    import onnxruntime

    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False)
    return describe(onnxruntime=onnxruntime.__version__, redis_server=redis_version.stdout.strip())


def resolve_model(repository: Path | None, scratch: Path) -> tuple[Path, str, str]:
    """(repository, model name, description): the real default model if exported, else the tiny one.

    The tiny repository is built by the service tests' own exporter into `scratch` (a few seconds,
    in a subprocess so this process does not pay for torch), so nothing depends on a pytest cache.
    """
    if repository is not None:
        names = sorted(p.name for p in repository.iterdir() if p.is_dir())
        if not names:
            raise SystemExit(f"{repository} holds no model folder")
        return repository, names[0], f"{names[0]} from {repository}"
    default = ROOT / "model_repository" / DEFAULT_MODEL
    versions = list_versions(default)
    if versions:
        latest = versions[-1]
        return default.parent, DEFAULT_MODEL, f"{DEFAULT_MODEL} v{latest} (model_repository)"
    code = "import sys, pathlib; from tests.service.tiny_repo import build_tiny_repository as b; b(pathlib.Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(scratch)], cwd=ROOT, check=True)
    description = "tiny random-weight test repository (tests/service/tiny_repo.py): no trained export yet"
    return scratch, "tiny", description


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def entry_point(name: str) -> list[str]:
    """The console script if installed beside this Python, else the same function via `-c`."""
    script = Path(sys.executable).with_name(name)
    if script.is_file():
        return [str(script)]
    function = {"pae-serve": "serve_main", "pae-worker": "worker_main"}[name]
    return [sys.executable, "-c", f"from service.cli import {function}; {function}()"]


def child_pid(proc: subprocess.Popen[bytes]) -> int:
    """The PID of the program `timeout` runs (its only child): signals and /proc readings go there."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            listed = children.read_text().split()
            if listed:
                return int(listed[0])
        time.sleep(0.01)
    raise RuntimeError(f"timeout (pid {proc.pid}) started no child")


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RedisServer:
    """A redis-server on a fixed loopback port and data folder, so it can be restarted in place.

    `appendonly` is on, as in the shipped deployment (deploy/compose.yaml, the k8s ConfigMap): a
    restarted Redis comes back with its streams, consumer groups and pending entries.
    """

    def __init__(self, password: str | None = None, appendonly: bool = True) -> None:
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.workdir = tempfile.mkdtemp(prefix="pae-bench-redis-")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=10)

    def start(self, timeout_s: float = 10.0) -> None:
        args = ["timeout", "-s", "KILL", str(LIFETIME_S), "redis-server", "--port", str(self.port)]
        args += ["--bind", "127.0.0.1", "--save", "", "--dir", self.workdir]
        args += ["--appendonly", "yes" if self.appendonly else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = child_pid(self.popen)
        client = self.client()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline or self.popen.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM: a clean shutdown that writes the append-only file)."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        self.popen = None


@dataclass
class Proc:
    """A service process: the `timeout` wrapper, the real program's PID, its port and log file."""

    kind: str
    popen: subprocess.Popen[bytes]
    pid: int
    port: int
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Topology:
    """redis-server + API replicas + workers as real processes on 127.0.0.1."""

    repository: Path
    model: str
    api_replicas: int = 2
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    redis_password: str | None = None
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pae-bench-run-")))

    def __post_init__(self) -> None:
        self.redis = RedisServer(password=self.redis_password)
        self.apis: list[Proc | None] = [None] * self.api_replicas
        self.worker_procs: list[Proc | None] = [None] * self.workers
        self._spawned = 0

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAX_BATCH_SIZE_", "MAX_WAIT_MS_"))}
        env.update(
            {
                "REDIS_URL": self.redis.url,
                "MODEL_REPOSITORY": str(self.repository),
                "MODEL_NAME": self.model,
                "OMP_NUM_THREADS": "1",
                "ORT_INTRA_OP_THREADS": "1",
                "QUEUE_MAX_LEN": "1024",
                "REQUEST_TIMEOUT_S": "30",
                "MAX_STEPS": "50",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(self.env)
        return env

    def _spawn(self, kind: str, command: list[str], env: dict[str, str], port: int) -> Proc:
        self._spawned += 1
        log = self.run_dir / f"{kind}-{self._spawned}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                ["timeout", "-s", "KILL", str(LIFETIME_S), *command],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return Proc(kind, popen, child_pid(popen), port, log)

    def start_api(self, i: int, port: int | None = None) -> Proc:
        port = port or free_port()
        command = [*entry_point("pae-serve"), "--port", str(port), "--log-level", "warning"]
        self.apis[i] = self._spawn("api", command, self.base_env(), port)
        return self.apis[i]

    def start_worker(self, i: int) -> Proc:
        port = free_port()
        env = {**self.base_env(), "WORKER_METRICS_PORT": str(port)}
        command = [*entry_point("pae-worker"), "--log-level", "warning"]
        self.worker_procs[i] = self._spawn("worker", command, env, port)
        return self.worker_procs[i]

    def start(self, ready_timeout_s: float = 180.0) -> None:
        self.redis.start()
        for i in range(self.workers):
            self.start_worker(i)
        for i in range(self.api_replicas):
            self.start_api(i)
        self.wait_ready(ready_timeout_s)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p.port}" for p in self.apis if p is not None]

    def auth_headers(self) -> dict[str, str]:
        key = self.env.get("API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def wait_ready(self, timeout_s: float = 180.0, workers: int | None = None) -> None:
        """Every API replica reports at least `workers` live workers (default: all of them)."""
        want = self.workers if workers is None else workers
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in [*self.apis, *self.worker_procs]:
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{proc.kind} exited early:\n{proc.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                states = [
                    httpx.get(f"{u}/v1/models", timeout=2, headers=self.auth_headers()).json()
                    for u in self.urls
                ]
                if all(len(s["models"][0]["workers"]) >= want for s in states):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the topology did not become ready within {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop_proc(self, proc: Proc | None, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        """Signal the program (not its `timeout` wrapper) and wait for it to exit."""
        if proc is None or not proc.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.popen.wait()

    def stop(self) -> None:
        """Stop every process and delete Redis's data folder and the logs."""
        for proc in [*self.apis, *self.worker_procs]:
            self.stop_proc(proc)
        self.redis.stop()
        shutil.rmtree(self.redis.workdir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def processes(self) -> dict[str, int]:
        """name → PID of every live service process and redis-server."""
        named = {f"api{i}": p.pid for i, p in enumerate(self.apis) if p is not None and p.alive()}
        named |= {f"worker{i}": p.pid for i, p in enumerate(self.worker_procs) if p is not None and p.alive()}
        if self.redis.popen is not None:
            named["redis"] = self.redis.pid
        return named

    def worker_metrics(self) -> list[str]:
        """The /metrics text of every live worker."""
        texts = []
        for proc in self.worker_procs:
            if proc is not None and proc.alive():
                with contextlib.suppress(httpx.HTTPError):
                    texts.append(httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=5).text)
        return texts

    def api_metrics(self) -> list[str]:
        texts = []
        for url in self.urls:
            with contextlib.suppress(httpx.HTTPError):
                texts.append(httpx.get(f"{url}/metrics", timeout=5).text)
        return texts

    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric_sum(texts: Sequence[str], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`, over several exposition texts."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for text in texts:
        for line in text.splitlines():
            labelled = line.startswith(name + "{") and all(w in line for w in wanted)
            if labelled or (line.startswith(name + " ") and not wanted):
                total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- traffic


@dataclass(frozen=True)
class ModelShape:
    image_size: int
    latent_shape: tuple[int, ...]
    class_names: tuple[str, ...]

    @classmethod
    def load(cls, repository: Path, model: str) -> ModelShape:
        config = ModelConfig.load(resolve_version_dir(repository, model))
        return cls(config.image_size, config.latent_shape, config.class_names)


@dataclass(frozen=True)
class Call:
    """One HTTP request: path, httpx keyword arguments, and a check that the answer is this request's."""

    path: str
    kwargs: dict
    check: Callable[[httpx.Response], bool] = lambda _r: True


def png_bytes(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def unit_latent(shape: Sequence[int], seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal(tuple(shape)).astype("<f4")
    return z / np.sqrt((z**2).mean(axis=0, keepdims=True))


def latent_body(z: np.ndarray) -> dict[str, object]:
    return {"shape": list(z.shape), "dtype": "float32", "data": base64.b64encode(z.tobytes()).decode()}


class Requests:
    """Request factories per endpoint over small input pools, so the client does little work per call.

    With `verify` (a repository version folder), the expected encode and decode outputs of every
    pooled input are computed once with the same ONNX Runtime backend the workers run, and each
    answer is compared with its own input's; generate answers must carry the request's seed.
    """

    def __init__(self, shape: ModelShape, pool: int = 64, verify: Path | None = None) -> None:
        self.shape = shape
        self.images = [png_bytes(shape.image_size, s) for s in range(pool)]
        self.latents = [unit_latent(shape.latent_shape, s) for s in range(pool)]
        self.bodies = [latent_body(z) for z in self.latents]
        self.expected: dict[str, list[np.ndarray]] | None = None
        if verify is not None:
            self.expected = self._references(verify)

    def _references(self, version_dir: Path) -> dict[str, list[np.ndarray]]:
        from service.codecs import decode_image, to_uint8
        from service.runtimes.onnxruntime import OnnxRuntime

        runtime = OnnxRuntime(version_dir, intra_op_threads=1)
        size = self.shape.image_size
        images = np.stack([decode_image(b, size, size * size) for b in self.images]).astype(np.float32) / 255
        return {
            "encode": list(runtime.encode(images)),
            "decode": list(to_uint8(runtime.decode(np.stack(self.latents)))),
        }

    def make(self, endpoint: str, n: int) -> Call:
        k = n % len(self.images)
        if endpoint == "encode":
            return Call(
                "/v1/encode",
                {"content": self.images[k], "headers": {"Content-Type": "image/png"}},
                lambda r, k=k: self._check_encode(r, k),
            )
        if endpoint == "decode":
            return Call("/v1/decode", {"json": self.bodies[k]}, lambda r, k=k: self._check_decode(r, k))
        seed = 1_000_000 + n
        label = n % len(self.shape.class_names)
        body = {"class_label": label, "seed": seed, "steps": GENERATE_STEPS}

        def own(response: httpx.Response) -> bool:
            image = response.json()["images"][0]
            return image["seed"] == seed and image["class_name"] == self.shape.class_names[label]

        return Call("/v1/generate", {"json": body}, own)

    def _check_encode(self, response: httpx.Response, k: int) -> bool:
        body = response.json()
        got = np.frombuffer(base64.b64decode(body["data"]), "<f4").reshape(body["shape"])
        if self.expected is None:
            return got.shape[1:] == self.shape.latent_shape
        return bool(np.abs(got[0] - self.expected["encode"][k]).max() < 1e-4)

    def _check_decode(self, response: httpx.Response, k: int) -> bool:
        png = base64.b64decode(response.json()["images"][0]["png"])
        if self.expected is None:
            return png.startswith(b"\x89PNG")
        got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)
        return bool(np.abs(got.astype(int) - self.expected["decode"][k]).max() <= 1)


@dataclass
class Sample:
    """What one request ended in, and when."""

    status: int
    latency_ms: float
    compute_ms: float | None
    queue_ms: float | None
    error: str = ""
    sent_at: float = 0.0
    endpoint: str = ""
    retry_after: str | None = None


async def one_call(
    http: httpx.AsyncClient, url: str, call: Call, headers: dict[str, str], endpoint: str = ""
) -> Sample:
    kwargs = dict(call.kwargs)
    kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
    sent = time.time()
    start = time.perf_counter()
    try:
        response = await http.post(url + call.path, **kwargs)
    except httpx.HTTPError as exc:
        latency = (time.perf_counter() - start) * 1000
        return Sample(0, latency, None, None, f"{type(exc).__name__}: {exc}", sent, endpoint)
    latency = (time.perf_counter() - start) * 1000
    compute = response.headers.get("x-compute-ms")
    queue = response.headers.get("x-queue-ms")
    error = ""
    if response.status_code == 200:
        try:
            if not call.check(response):
                error = "answer belongs to another request"
        except (ValueError, KeyError, TypeError, OSError) as exc:
            error = f"answer could not be parsed: {exc}"
    else:
        error = response.text[:300]
    return Sample(
        response.status_code,
        latency,
        float(compute) if compute else None,
        float(queue) if queue else None,
        error,
        sent,
        endpoint,
        response.headers.get("retry-after"),
    )


async def closed_loop(
    urls: Sequence[str],
    make: Callable[[int], tuple[str, Call]],
    concurrency: int,
    duration_s: float | None = None,
    total: int | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 45.0,
    stop: threading.Event | None = None,
) -> tuple[list[Sample], float]:
    """`concurrency` loops sending requests back to back (loop i to replica i mod len(urls)) until
    the time or request budget is spent or `stop` is set; `make(n)` gives request n's endpoint and
    call. After a connection error a loop pauses briefly, as a client would before retrying a
    replica that is restarting. Returns the samples and the elapsed seconds."""
    counter = iter(range(10**12))
    stop_at = None if duration_s is None else time.perf_counter() + duration_s
    samples: list[Sample] = []

    async def loop(url: str) -> None:
        # One client (one keep-alive connection to one replica) per loop: a shared pool of many
        # connections costs the load generator about twice the CPU per request (4.5 vs 2 ms here).
        # They share one TLS context: building one per client costs 40 ms of CPU (CA bundle).
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits, verify=_tls_context()) as http:
            while True:
                n = next(counter)
                if total is not None and n >= total:
                    return
                if stop_at is not None and time.perf_counter() >= stop_at:
                    return
                if stop is not None and stop.is_set():
                    return
                endpoint, call = make(n)
                samples.append(await one_call(http, url, call, headers or {}, endpoint))
                if samples[-1].status == 0:
                    await asyncio.sleep(CONNECTION_RETRY_S)

    start = time.perf_counter()
    await asyncio.gather(*(loop(urls[i % len(urls)]) for i in range(concurrency)))
    return samples, time.perf_counter() - start


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def drive(coro: Coroutine[object, object, T]) -> T:
    """Run a coroutine on uvloop when installed (uvicorn[standard] ships it): the load generator
    shares the machine's cores with the service, so its own CPU per request matters."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 2) if len(values) else None


def summarise(samples: Sequence[Sample], elapsed: float) -> dict[str, object]:
    """Throughput of verified answers, latency percentiles, and the errors by status."""
    ok = [s for s in samples if s.status == 200 and not s.error]
    latencies = [s.latency_ms for s in ok]
    statuses: dict[str, int] = {}
    for s in samples:
        if s.status != 200 or s.error:
            key = str(s.status) if s.status else "connection"
            statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(samples),
        "rps": round(len(ok) / elapsed, 2),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": round(max(latencies), 2) if latencies else None,
        "errors": len(samples) - len(ok),
        "error_statuses": statuses,
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
    }
