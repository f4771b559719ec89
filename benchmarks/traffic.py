"""Traffic for the load and fault runs: verified requests from a closed loop of async clients.

An async httpx client keeps `c` requests in flight (a closed loop); every answer is checked to belong
to its request (the seed for generate; for encode and decode, the output a local ONNX Runtime session
computes for that input), so a mixed-up reply is counted as an error, not a success.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from PIL import Image

from export.repository import ModelConfig, resolve_version_dir

TASKS = ("encode", "decode", "generate")
GENERATE_STEPS = 4
CONNECTION_RETRY_S = 0.2
T = TypeVar("T")


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
