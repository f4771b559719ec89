"""The load generator every server in the comparison gets: a closed loop of keep-alive HTTP/1.1
connections sending prebuilt requests, checking that every answer is its own request's.

It is a few dozen lines of asyncio instead of httpx because the client shares the two cores with
the server under test: httpx costs about 1.4 ms of CPU per request here, more than a server's own
share at high concurrency, which would make the client the bottleneck of every server alike. The
checks stay strict: each encode answer is compared with the latent a local ONNX Runtime session
computes for that input (≤ 1e-4), each decode answer's PNG with the expected pixels (≤ 1 level);
an answer byte-identical to one already verified for the same input is accepted without decoding it
again.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.traffic import ModelShape, latent_body, png_bytes, unit_latent

ENDPOINTS = ("encode", "decode")
POOL = 64


@dataclass
class Sample:
    """One answer: when it was sent, how long it took, whether it was verified, and the server's
    timing headers (the service sends X-Compute-Ms and Server-Timing; peers send none)."""

    latency_ms: float
    status: int
    ok: bool
    error: str = ""
    compute_ms: float | None = None
    stages: dict[str, float] = field(default_factory=dict)


class Workload:
    """Prebuilt requests over a pool of inputs, and each input's expected answer.

    Expected answers come from the reference graphs run one input at a time with ONNX Runtime, so a
    batched server must give the same latents and pixels as an unbatched one.
    """

    def __init__(self, shape: ModelShape, version_dir: Path, host: str, pool: int = POOL) -> None:
        from service.codecs import decode_image, to_uint8
        from service.runtimes.onnxruntime import OnnxRuntime

        self.images = [png_bytes(shape.image_size, s) for s in range(pool)]
        latents = [unit_latent(shape.latent_shape, s) for s in range(pool)]
        runtime = OnnxRuntime(version_dir, intra_op_threads=1)
        size = shape.image_size
        pixels = [decode_image(b, size, size * size) for b in self.images]
        self.expected = {
            "encode": [runtime.encode(p[None].astype(np.float32) / 255)[0] for p in pixels],
            "decode": [to_uint8(runtime.decode(z[None]))[0] for z in latents],
        }
        self.requests = {
            "encode": [_request(host, "/v1/encode", "image/png", b) for b in self.images],
            "decode": [
                _request(host, "/v1/decode", "application/json", json.dumps(latent_body(z)).encode())
                for z in latents
            ],
        }
        self._verified: dict[tuple[str, int], set[bytes]] = {}

    def check(self, endpoint: str, k: int, body: bytes) -> str:
        """'' when `body` is the right answer to input k of `endpoint`, else what is wrong."""
        seen = self._verified.setdefault((endpoint, k), set())
        if body in seen:
            return ""
        try:
            answer = json.loads(body)
            if endpoint == "encode":
                got = np.frombuffer(base64.b64decode(answer["data"]), "<f4").reshape(answer["shape"])[0]
                good = got.shape == self.expected["encode"][k].shape and bool(
                    np.abs(got - self.expected["encode"][k]).max() < 1e-4
                )
            else:
                png = base64.b64decode(answer["images"][0]["png"])
                got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)
                good = bool(np.abs(got.astype(int) - self.expected["decode"][k]).max() <= 1)
        except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:
            return f"unparsable answer: {type(exc).__name__}: {exc}"
        if not good:
            return "answer differs from this input's expected output"
        if len(seen) < 4:
            seen.add(body)
        return ""


def _request(host: str, path: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection: write a request, read one response (Content-Length or
    chunked)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def server_timing(value: str) -> dict[str, float]:
    """`Server-Timing: name;dur=1.2, ...` → {name: 1.2}."""
    stages = {}
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, dur = param.strip().partition("=")
            if key == "dur":
                stages[name] = float(dur)
    return stages


async def closed_loop(
    workload: Workload, endpoint: str, port: int, concurrency: int, duration_s: float, host: str = "127.0.0.1"
) -> tuple[list[Sample], float]:
    """`concurrency` connections sending `endpoint` requests back to back for `duration_s`."""
    requests = workload.requests[endpoint]
    samples: list[Sample] = []
    counter = iter(range(10**12))
    stop_at = time.perf_counter() + duration_s

    async def loop() -> None:
        conn = Connection(host, port)
        try:
            while time.perf_counter() < stop_at:
                k = next(counter) % len(requests)
                start = time.perf_counter()
                try:
                    status, headers, body = await conn.request(requests[k])
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    conn.close()
                    samples.append(Sample((time.perf_counter() - start) * 1000, 0, False, repr(exc)))
                    await asyncio.sleep(0.1)
                    continue
                latency = (time.perf_counter() - start) * 1000
                error = workload.check(endpoint, k, body) if status == 200 else body[:200].decode("latin-1")
                compute = headers.get("x-compute-ms")
                samples.append(
                    Sample(
                        latency,
                        status,
                        not error,
                        error,
                        float(compute) if compute else None,
                        server_timing(headers["server-timing"]) if "server-timing" in headers else {},
                    )
                )
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 3) if len(values) else None
